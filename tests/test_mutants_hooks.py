"""steer / record paths that mutation testing (bench/mutation.py) found untested.

Each test names the mutants of src/steerdiff/hooks.py it kills; each was re-run with
`mutmut run <name>` and seen killed. docs/testing.md has the counts.
"""

from __future__ import annotations

import pytest
import torch
from conftest import make_tiny

from steerdiff.hooks import record, steer

HOOK = "blocks.0.hook_resid_post"


@pytest.fixture(scope="module")
def llama():
    return make_tiny("llama")


def changed_positions(model, call) -> torch.Tensor:
    """Bool [batch, pos]: where steering HOOK (positions 'first:2') changed the residual."""
    v = torch.full((64,), 3.0)
    with torch.no_grad(), record(model, HOOK) as rec:
        call()
        with steer(model, {HOOK: v}, positions="first:2"):
            call()
    base, steered = rec.chunks[HOOK]
    return (steered - base).abs().amax(-1) > 1e-4


@pytest.mark.parametrize("style", ["input_ids keyword", "input_ids positional", "inputs_embeds"])
def test_first_k_skips_left_padding_however_the_model_is_called(llama, style):
    """Catches: the forward's length read from the wrong argument (positional input_ids, or
    inputs_embeds, not found), so the attention mask is never read and 'first:2' acts on
    the left padding of a padded row instead of its first two real tokens."""
    ids = torch.randint(3, 200, (2, 5))
    am = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    calls = {
        "input_ids keyword": lambda: llama(input_ids=ids, attention_mask=am),
        "input_ids positional": lambda: llama(ids, attention_mask=am),
        "inputs_embeds": lambda: llama(
            inputs_embeds=llama.get_input_embeddings()(ids), attention_mask=am
        ),
    }
    want = torch.tensor([[0, 0, 1, 1, 0], [1, 1, 0, 0, 0]], dtype=torch.bool)
    assert torch.equal(changed_positions(llama, calls[style]), want)


def test_recording_concatenates_forward_passes_and_names_an_empty_hook(llama):
    """Catches: a recording of two forward passes that returns only the first one, and the
    'no forward pass ran' error raised without saying which hook."""
    a, b = torch.randint(3, 200, (1, 3)), torch.randint(3, 200, (1, 2))
    with torch.no_grad(), record(llama, HOOK) as rec:
        llama(input_ids=a)
        first = rec[HOOK].clone()
        llama(input_ids=b)
    assert rec[HOOK].shape == (1, 5, 64)
    torch.testing.assert_close(rec[HOOK][:, :3], first, rtol=0, atol=0)
    torch.testing.assert_close(rec[HOOK], torch.cat(rec.chunks[HOOK], dim=1), rtol=0, atol=0)
    with record(llama, HOOK) as empty:
        pass
    with pytest.raises(KeyError, match=f"{HOOK} was hooked but no forward pass ran"):
        empty[HOOK]


def test_a_block_called_with_hidden_states_as_a_keyword_is_steered():
    """Catches: the resid_pre vector read from, or written to, the wrong place when a block
    is called as block(hidden_states=x) (the keyword path of the input hooks)."""
    gpt2 = make_tiny("gpt2")
    block = gpt2.transformer.h[1]
    x = torch.randn(1, 4, 64, generator=torch.Generator().manual_seed(2))
    v = torch.randn(64, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        want = block(x + v)
        with steer(gpt2, {"blocks.1.hook_resid_pre": v}):
            got = block(hidden_states=x)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_first_k_and_prompt_without_attention_mask_or_cache(llama):
    """Catches: a forward without a KV cache counted as having one token cached (positions
    shift by one: 'first:2' hits positions 1-2, 'prompt' misses the last token), and
    'first:k' taking k + 1 tokens when there is no attention mask."""
    ids = torch.randint(3, 200, (2, 5))
    first2 = changed_positions(llama, lambda: llama(input_ids=ids))
    assert torch.equal(first2, torch.tensor([[1, 1, 0, 0, 0]] * 2, dtype=torch.bool))
    v = torch.full((64,), 3.0)
    with torch.no_grad(), record(llama, HOOK) as rec:
        llama(input_ids=ids)
        with steer(llama, {HOOK: v}, positions="prompt"):
            llama(input_ids=ids)
    base, steered = rec.chunks[HOOK]
    torch.testing.assert_close(steered, base + v, rtol=0, atol=1e-5)


def test_float32_vectors_and_coefficients_steer_a_bfloat16_model_in_bfloat16():
    """Catches: the vector or the per-row coefficients not cast to the activations' dtype:
    a float32 vector then turns a bfloat16 residual into float32 (the next layer fails or
    the model silently runs in another precision)."""
    model = make_tiny("llama").to(torch.bfloat16)
    ids = torch.randint(3, 200, (2, 4))
    v = torch.randn(64, generator=torch.Generator().manual_seed(4))
    coeff = torch.tensor([1.0, -2.0])
    with torch.no_grad(), record(model, HOOK) as rec:
        model(input_ids=ids)
        with steer(model, {HOOK: v}, coeff=coeff):
            model(input_ids=ids)
    base, steered = rec.chunks[HOOK]
    assert steered.dtype == torch.bfloat16
    want = base + coeff.view(-1, 1, 1).to(torch.bfloat16) * v.to(torch.bfloat16)
    torch.testing.assert_close(steered, want, rtol=0, atol=0)


def test_ablating_a_short_direction_removes_the_whole_component(llama):
    """Catches: the direction normalised with a floor of 1 instead of 1e-12, so a vector
    shorter than 1 is not made a unit vector and only part of the component is removed."""
    ids = torch.randint(3, 200, (1, 4))
    with torch.no_grad(), record(llama, HOOK) as rec:
        llama(input_ids=ids)
    base = rec[HOOK]
    v = 0.5 * base[0].mean(0) / base[0].mean(0).norm()  # along the residual, norm 0.5
    with torch.no_grad(), record(llama, HOOK) as rec, steer(llama, {HOOK: v}, op="ablate"):
        llama(input_ids=ids)
    unit = v / v.norm()
    want = base - (base @ unit)[..., None] * unit
    torch.testing.assert_close(rec[HOOK], want, rtol=0, atol=1e-6)
    assert (rec[HOOK] @ unit).abs().max() < 1e-6 < (base @ unit).abs().max()


def test_steering_with_no_vectors_changes_nothing(llama):
    """Catches: the finiteness check run on an empty list of vectors (it reads the first
    flag of none and raises IndexError), so `steer(model, {})` fails instead of being a
    no-op (a sweep or a pipeline stage can have nothing to steer)."""
    ids = torch.randint(3, 200, (1, 4))
    with torch.no_grad():
        base = llama(input_ids=ids).logits
        with steer(llama, {}):
            got = llama(input_ids=ids).logits
    torch.testing.assert_close(got, base, rtol=0, atol=0)


def test_a_non_finite_per_row_coefficient_is_refused_with_several_hooks(llama):
    """Catches: the per-row coefficient's finiteness read from the wrong entry (the second
    vector's instead of the coefficient's), which lets a NaN coefficient through as soon as
    two hooks are steered."""
    from steerdiff import hooks

    vecs = {"blocks.0.hook_resid_post": torch.ones(64), "blocks.1.hook_resid_post": torch.ones(64)}
    coeff = torch.tensor([1.0, float("nan")])
    msg = r"coeff tensor \[1.0, nan\] for steering at blocks.0.hook_resid_post, blocks.1.hook"
    with pytest.raises(hooks.NonFiniteError, match=msg):
        with steer(llama, vecs, coeff=coeff):
            pass


def test_lists_become_float32_vectors_and_bad_lists_are_named():
    """Catches: a list of numbers kept as float64 (a VectorSet built from lists then saves
    and exports float64), and the error for a ragged list losing its hook name and type."""
    from steerdiff import hooks

    v = hooks.as_vector("blocks.0.hook_resid_post", [1, 2.5])
    assert v.dtype == torch.float32 and v.tolist() == [1.0, 2.5]
    with pytest.raises(hooks.HookError, match=r"blocks.0.hook_resid_post is a list that is not"):
        hooks.as_vector("blocks.0.hook_resid_post", [[1.0], [2.0, 3.0]])
