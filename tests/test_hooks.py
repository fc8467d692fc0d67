"""Named hook points: placement, steering, recording, positions, cleanup (every family)."""

from __future__ import annotations

import pytest
import torch
from conftest import FAMILIES, make_tiny
from torch import nn

from steerdiff.errors import SteerdiffError
from steerdiff.hooks import (
    HookError,
    NonFiniteError,
    final_norm,
    get_hook_point,
    hook_dim,
    list_hook_points,
    record,
    select_hooks,
    steer,
)

IDS = torch.randint(3, 256, (2, 9), generator=torch.Generator().manual_seed(0))


def logits(model: nn.Module, ids: torch.Tensor = IDS, **kw) -> torch.Tensor:
    return model(input_ids=ids, **kw).logits


def rand_vec(model: nn.Module, name: str, seed: int = 1, scale: float = 1.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return scale * torch.randn(hook_dim(model, name), generator=g)


def test_record_resid_post_equals_hidden_states(tiny):
    n = tiny.config.num_hidden_layers
    with record(tiny, "blocks.*.hook_resid_post") as rec:
        out = tiny(input_ids=IDS, output_hidden_states=True)
    hs = out.hidden_states
    assert len(hs) == n + 1
    for layer in range(n - 1):
        torch.testing.assert_close(
            rec[f"blocks.{layer}.hook_resid_post"], hs[layer + 1], rtol=0, atol=0
        )
    # HF applies the final norm to the last hidden state; our hook is the raw block output
    last = rec[f"blocks.{n - 1}.hook_resid_post"]
    torch.testing.assert_close(final_norm(tiny)(last), hs[n], rtol=0, atol=0)


def test_residual_decomposition(tiny):
    """resid_mid = resid_pre + attn_out and resid_post = resid_mid + mlp_out, at every layer."""
    with record(tiny, "blocks.*.hook_{resid_pre,attn_out,resid_mid,mlp_out,resid_post}") as rec:
        tiny(input_ids=IDS)
    for layer in range(tiny.config.num_hidden_layers):
        r = {k.split(".", 2)[2]: v for k, v in rec.items() if k.startswith(f"blocks.{layer}.")}
        torch.testing.assert_close(r["hook_resid_pre"] + r["hook_attn_out"], r["hook_resid_mid"])
        torch.testing.assert_close(r["hook_resid_mid"] + r["hook_mlp_out"], r["hook_resid_post"])


def test_resid_pre_equals_previous_resid_post(tiny):
    v = rand_vec(tiny, "blocks.1.hook_resid_pre", scale=3.0)
    with steer(tiny, {"blocks.1.hook_resid_pre": v}):
        a = logits(tiny)
    with steer(tiny, {"blocks.0.hook_resid_post": v}):
        b = logits(tiny)
    torch.testing.assert_close(a, b)
    assert not torch.allclose(a, logits(tiny), atol=1e-4)  # the vector does something


def _with_qkv_bias(model: nn.Module, which: str, v: torch.Tensor) -> nn.Module:
    """The same model with v added to the bias of its q/k/v projection at layer 1."""
    hp = get_hook_point(model, f"blocks.1.attn.hook_{which}")
    proj = hp.write_module
    if hp.channel_slice is not None:  # gpt2's fused c_attn: bias covers [q | k | v]
        with torch.no_grad():
            proj.bias[hp.channel_slice] += v
        return model
    if proj.bias is None:
        new = nn.Linear(proj.in_features, proj.out_features, bias=True)
        with torch.no_grad():
            new.weight.copy_(proj.weight)
            new.bias.copy_(v)
        parent_name, attr = f"{which}_proj", f"{which}_proj"
        setattr(model.get_submodule(_parent_path(model, proj)), attr, new)
        del parent_name
    else:
        with torch.no_grad():
            proj.bias += v
    return model


def _parent_path(model: nn.Module, child: nn.Module) -> str:
    for name, m in model.named_modules():
        if m is child:
            return name.rsplit(".", 1)[0]
    raise AssertionError


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("which", ["q", "k", "v"])
def test_qkv_hook_equals_projection_bias(family, which):
    model = make_tiny(family)
    name = f"blocks.1.attn.hook_{which}"
    v = rand_vec(model, name, seed=3, scale=2.0)
    with steer(model, {name: v}):
        steered = logits(model)
    biased = logits(_with_qkv_bias(make_tiny(family), which, v))
    torch.testing.assert_close(steered, biased, rtol=1e-4, atol=1e-4)
    unsteered = logits(make_tiny(family))
    if family == "gpt2" and which == "k":
        # Without rotary embeddings a constant key bias adds q.b to every score of a query,
        # which softmax ignores: a real invariance, not a hook that failed to fire.
        torch.testing.assert_close(steered, unsteered, rtol=1e-4, atol=1e-4)
    else:
        assert not torch.allclose(steered, unsteered, atol=1e-4)


def _greedy(model, ids, mask, n=6):
    return model.generate(
        input_ids=ids, attention_mask=mask, max_new_tokens=n, do_sample=False, pad_token_id=0
    )


@pytest.mark.parametrize("family", ["llama", "gemma3_text", "gpt2"])
def test_response_positions_under_kv_cache(family):
    model = make_tiny(family)
    ids = IDS[:, :6]
    mask = torch.ones_like(ids)
    name = "blocks.1.hook_resid_post"
    with record(model, name) as plain:
        base = _greedy(model, ids, mask)
    v = rand_vec(model, name, scale=5.0)
    with steer(model, {name: v}, positions="response"), record(model, name) as rec:
        out = _greedy(model, ids, mask)
    # Prompt positions are untouched, so the first generated token (read off the last prompt
    # position) is the same; positions of generated tokens carry the vector.
    p = ids.shape[1]
    torch.testing.assert_close(rec[name][:, :p], plain[name][:, :p])
    assert torch.equal(out[:, : p + 1], base[:, : p + 1])
    gen_delta = rec[name][:, p : p + 1] - plain[name][:, p : p + 1]
    torch.testing.assert_close(gen_delta, v.expand_as(gen_delta), rtol=1e-4, atol=1e-4)


def _generate(model, ids, n):
    """HF greedy generation of exactly n tokens (no end-of-sequence stop), with its raw
    next-token logits."""
    model.generation_config.eos_token_id = None
    return model.generate(
        input_ids=ids,
        attention_mask=torch.ones_like(ids),
        max_new_tokens=n,
        do_sample=False,
        pad_token_id=0,
        output_logits=True,
        return_dict_in_generate=True,
    )


def _greedy_scores(model, ids, n=5) -> torch.Tensor:
    """HF greedy generation's next-token logits [steps, batch, vocab]."""
    return torch.stack(_generate(model, ids, n).logits)


# For each positions mode: which greedy steps (under the KV cache) see the vector. Step 0
# is read off the prefill (the prompt); step s >= 1 also reads the generated tokens.
STEPS_CHANGED = {"response": [0, 1, 1, 1, 1]}


@pytest.mark.parametrize("family", FAMILIES)
def test_zero_vector_is_identity_and_a_vector_fires(family):
    """Bug caught: the hooks perturbing the forward (a zero vector must change nothing,
    exactly), and, with a non-zero vector at the same hooks, steering that never fires in a
    positions mode (then the zero-vector check alone would pass)."""
    model = make_tiny(family)
    ids = IDS[:, :5]
    base = _greedy_scores(model, ids)
    names = select_hooks(model, "blocks.*.attn.hook_q") + ["blocks.0.hook_resid_post"]
    zeros = {n: torch.zeros(hook_dim(model, n)) for n in names}
    vecs = {n: rand_vec(model, n, seed=i, scale=3.0) for i, n in enumerate(names)}
    for positions in ("all", "response", "prompt", "first:2"):
        with steer(model, zeros, positions=positions):
            assert torch.equal(_greedy_scores(model, ids), base), positions
        with steer(model, vecs, positions=positions):
            steered = _greedy_scores(model, ids)
        changed = [
            int(not torch.allclose(a, b, atol=1e-4)) for a, b in zip(steered, base, strict=True)
        ]
        assert changed == STEPS_CHANGED.get(positions, [1, 1, 1, 1, 1]), positions


def _greedy_by_hand(model, ids, vecs, steer_prompt: bool, steer_generated: bool, n=4):
    """Greedy decoding written out: one prefill, then one token per forward with the KV
    cache, each forward steered at every position or not at all (no positions logic)."""
    from contextlib import nullcontext

    def ctx(on: bool):
        return steer(model, vecs) if on else nullcontext()

    with ctx(steer_prompt):
        out = model(input_ids=ids, use_cache=True)
    scores, tokens = [out.logits[:, -1]], [out.logits[:, -1].argmax(-1)]
    for _ in range(n - 1):
        with ctx(steer_generated):
            out = model(input_ids=tokens[-1][:, None], past_key_values=out.past_key_values)
        scores.append(out.logits[:, -1])
        tokens.append(out.logits[:, -1].argmax(-1))
    return torch.stack(scores), torch.cat([ids, torch.stack(tokens, 1)], 1)


@pytest.mark.parametrize("family", ["llama", "gemma3_text", "gpt2"])
@pytest.mark.parametrize("positions", ["prompt", "response"])
def test_prompt_and_response_positions_under_kv_cache_match_a_hand_decoding(family, positions):
    """Bug caught: positions="prompt" steering the generated tokens too (behaving like "all"),
    or "response" steering the prompt. Greedy generation under steer(positions=...) must give
    the scores and tokens of a hand-written decoding that steers only the prefill ("prompt")
    or only the one-token forwards ("response"), and differ from steering everything."""
    model = make_tiny(family)
    ids = IDS[:, :5]
    name = "blocks.1.hook_resid_post"
    vecs = {name: rand_vec(model, name, scale=5.0)}
    want_scores, want_ids = _greedy_by_hand(
        model, ids, vecs, positions == "prompt", positions == "response"
    )
    all_scores, _ = _greedy_by_hand(model, ids, vecs, True, True)
    with steer(model, vecs, positions=positions):
        out = _generate(model, ids, 4)
    torch.testing.assert_close(torch.stack(out.logits), want_scores, rtol=1e-4, atol=1e-4)
    assert torch.equal(out.sequences, want_ids)
    # the hand decoding differs from steering every position at the generated steps
    assert not torch.allclose(want_scores[1:], all_scores[1:], atol=1e-3)


@pytest.mark.parametrize("positions", ["prompt", "response"])
def test_a_prompt_fed_in_two_passes_inside_prompt_continues_is_one_prompt(positions):
    """A prompt run as a cached prefix and then the rest (what the sampler does with a
    shared prefix): inside hooks.PROMPT_CONTINUES the second pass is still the prompt, so
    the scores equal those of one prefill, and the next one-token pass is the response.
    Bug caught: the second pass (its cache is not empty) taken as response."""
    from transformers import DynamicCache

    from steerdiff.hooks import PROMPT_CONTINUES

    model = make_tiny("llama")
    ids, name = IDS[:, :6], "blocks.1.hook_resid_post"
    vecs = {name: rand_vec(model, name, scale=5.0)}
    nxt = torch.tensor([[7], [8]])

    def two_passes(continues: bool) -> torch.Tensor:
        cache = DynamicCache(config=model.config)
        model(input_ids=ids[:, :2], past_key_values=cache, use_cache=True)
        token = PROMPT_CONTINUES.set(continues)
        try:
            last = model(input_ids=ids[:, 2:], past_key_values=cache, use_cache=True).logits
        finally:
            PROMPT_CONTINUES.reset(token)
        step = model(input_ids=nxt, past_key_values=cache, use_cache=True).logits
        return torch.stack([last[:, -1], step[:, -1]])  # [2 passes, batch, vocab]

    with torch.no_grad(), steer(model, vecs, positions=positions):
        one = model(input_ids=ids, use_cache=True)
        step = model(input_ids=nxt, past_key_values=one.past_key_values).logits
        want = torch.stack([one.logits[:, -1], step[:, -1]])
        split, wrong = two_passes(True), two_passes(False)
    torch.testing.assert_close(split, want, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(wrong[0], want[0], atol=1e-3)  # the flag is what makes it so
    assert not PROMPT_CONTINUES.get()


def test_prompt_positions_only_prompt(tiny_lm):
    """Bug caught: positions="prompt" adding the vector at generated positions too.
    Activations under greedy generation equal a teacher-forced pass over the same tokens
    steered by a mask of the prompt positions, at every position (prompt and generated)."""
    model = tiny_lm.model
    name = "blocks.0.hook_resid_post"
    v = rand_vec(model, name, scale=4.0)
    ids, mask = IDS[:, :5], torch.ones_like(IDS[:, :5])
    with record(model, name) as plain:
        _greedy(model, ids, mask, n=3)
    with steer(model, {name: v}, positions="prompt"), record(model, name) as rec:
        out = _greedy(model, ids, mask, n=3)
    d = rec[name] - plain[name]
    torch.testing.assert_close(d[:, :5], v.expand(2, 5, -1), rtol=1e-4, atol=1e-4)
    fed = out[:, :-1]  # the last generated token is never fed back
    prompt_mask = torch.zeros(fed.shape, dtype=torch.bool)
    prompt_mask[:, :5] = True
    with steer(model, {name: v}, positions=prompt_mask), record(model, name) as forced:
        model(input_ids=fed)
    assert rec[name].shape == forced[name].shape == (2, 7, 64)
    torch.testing.assert_close(rec[name], forced[name], rtol=1e-4, atol=1e-4)


def test_first_k_skips_left_padding(tiny_lm):
    model = tiny_lm.model
    name = "blocks.0.hook_resid_pre"
    v = rand_vec(model, name)
    ids = IDS[:, :6].clone()
    mask = torch.ones_like(ids)
    mask[0, :2] = 0  # row 0 is left-padded by two tokens
    with record(model, name) as plain:
        model(input_ids=ids, attention_mask=mask)
    with steer(model, {name: v}, positions="first:2"), record(model, name) as rec:
        model(input_ids=ids, attention_mask=mask)
    changed = (rec[name] - plain[name]).norm(dim=-1) > 1e-6  # [batch, pos]
    assert changed[0].tolist() == [False, False, True, True, False, False]
    assert changed[1].tolist() == [True, True, False, False, False, False]


def test_mask_positions_and_bad_mask(tiny_lm):
    model = tiny_lm.model
    name = "blocks.0.hook_resid_post"
    v = rand_vec(model, name)
    m = torch.zeros(2, 9, dtype=torch.bool)
    m[:, 4:] = True
    with record(model, name) as plain:
        model(input_ids=IDS)
    with steer(model, {name: v}, positions=m), record(model, name) as rec:
        model(input_ids=IDS)
    changed = (rec[name] - plain[name]).norm(dim=-1) > 1e-6
    assert torch.equal(changed, m)
    with pytest.raises(HookError, match=r"\[batch, pos\] = \[2, 9\]"):
        with steer(model, {name: v}, positions=torch.ones(2, 3, dtype=torch.bool)):
            model(input_ids=IDS)


def test_steer_nests_and_record_sees_steering(tiny_lm):
    model = tiny_lm.model
    name = "blocks.1.hook_resid_post"
    a, b = rand_vec(model, name, 1), rand_vec(model, name, 2)
    with steer(model, {name: a + b}):
        both = logits(model)
    with record(model, name) as outer, steer(model, {name: a}):
        with steer(model, {name: b}):
            nested = logits(model)
    torch.testing.assert_close(nested, both, rtol=1e-5, atol=1e-5)
    with record(model, name) as plain:
        logits(model)
    torch.testing.assert_close(outer[name] - plain[name], (a + b).expand_as(plain[name]))


def test_ablate_removes_component(tiny_lm):
    model = tiny_lm.model
    name = "blocks.1.hook_resid_post"
    v = rand_vec(model, name)
    with record(model, name) as plain:
        model(input_ids=IDS)
    with steer(model, {name: v}, op="ablate"), record(model, name) as rec:
        model(input_ids=IDS)
    unit = v / v.norm()
    proj = rec[name] @ unit
    assert proj.abs().max() < 1e-4
    # only the component along v is gone: h - (h.u) u, not a zeroed or rescaled residual
    h = plain[name]
    torch.testing.assert_close(rec[name], h - (h @ unit)[..., None] * unit, rtol=0, atol=1e-5)
    with steer(model, {name: v}, coeff=0.5, op="ablate"), record(model, name) as half:
        model(input_ids=IDS)
    torch.testing.assert_close(
        half[name], h - 0.5 * (h @ unit)[..., None] * unit, atol=1e-5, rtol=0
    )


@pytest.mark.parametrize("where", ["steer", "record", "both"])
def test_hooks_removed_after_exception(tiny, where):
    base = logits(tiny)
    name = "blocks.1.hook_resid_post"
    v = rand_vec(tiny, name, scale=10.0)
    with pytest.raises(RuntimeError, match="boom"):
        if where == "steer":
            with steer(tiny, {name: v}, positions="response"):
                logits(tiny)
                raise RuntimeError("boom")
        elif where == "record":
            with record(tiny, "blocks.*.hook_resid_pre"):
                logits(tiny)
                raise RuntimeError("boom")
        else:
            with steer(tiny, {name: v}), record(tiny, name):
                raise RuntimeError("boom")
    torch.testing.assert_close(logits(tiny), base, rtol=0, atol=0)
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in tiny.modules())


def test_list_and_select(tiny_lm):
    model = tiny_lm.model
    names = list_hook_points(model)
    assert len(names) == 3 * 10 and names[0] == "blocks.0.hook_resid_pre"
    qkv = select_hooks(model, "blocks.*.attn.hook_{q,k,v}")
    assert len(qkv) == 9 and qkv[:3] == [f"blocks.0.attn.hook_{w}" for w in "qkv"]
    assert select_hooks(model, "blocks.1-2.hook_resid_post") == [
        "blocks.1.hook_resid_post",
        "blocks.2.hook_resid_post",
    ]
    assert select_hooks(model, ["blocks.2.hook_mlp_out", "blocks.0.ln1.hook_normalized"]) == [
        "blocks.0.ln1.hook_normalized",
        "blocks.2.hook_mlp_out",
    ]
    assert hook_dim(model, "blocks.0.attn.hook_q") == 64  # 4 heads x 16
    assert hook_dim(model, "blocks.0.attn.hook_k") == 32  # 2 kv heads x 16


def test_unknown_hook_lists_nearest(tiny_lm):
    with pytest.raises(HookError, match=r"Nearest names: .*blocks\.1\.hook_resid_post"):
        with steer(tiny_lm.model, {"blocks.1.hook_resid_pots": torch.zeros(64)}):
            pass
    with pytest.raises(HookError, match="3 layers"):
        select_hooks(tiny_lm.model, "blocks.7.hook_resid_post")
    with pytest.raises(HookError, match="Unknown hook point"):
        record(tiny_lm.model, "blocks.*.hook_nothing").__enter__()


def test_layer_ranges_and_brace_alternatives_past_the_model_are_errors(tiny_lm):
    """Bug caught: blocks.1-40.x on a 3-layer model silently clipped to blocks.1-2.x, and
    one brace alternative that matches nothing dropped without a word."""
    m = tiny_lm.model
    with pytest.raises(HookError, match=r"Layer range 1-40 .* has 3 layers \(0-2\)\. Use "):
        select_hooks(m, "blocks.1-40.hook_resid_post")
    with pytest.raises(HookError, match=r"'blocks\.1-2\.hook_resid_post' or 'blocks\.1-\."):
        select_hooks(m, "blocks.1-40.hook_resid_post")
    with pytest.raises(HookError, match=r"Layer range 5- .* 3 layers \(0-2\)"):
        select_hooks(m, "blocks.5-.hook_resid_post")
    with pytest.raises(HookError, match=r"Empty layer range 2-1 .* 'blocks\.1-2\."):
        select_hooks(m, "blocks.2-1.hook_resid_post")
    with pytest.raises(
        HookError, match=r"'blocks\.7\.hook_resid_post' \(from 'blocks\.\{1,7\}.*3 layers"
    ):
        select_hooks(m, "blocks.{1,7}.hook_resid_post")
    with pytest.raises(HookError, match=r"'blocks\.\*\.attn\.hook_x' \(from"):
        select_hooks(m, "blocks.*.attn.hook_{q,x}")
    assert select_hooks(m, "blocks.1-.hook_resid_post") == [H1, "blocks.2.hook_resid_post"]
    assert select_hooks(m, "blocks.0-2.attn.hook_{q,k}") == [
        f"blocks.{i}.attn.hook_{w}" for i in range(3) for w in "qk"
    ]


H1 = "blocks.1.hook_resid_post"


@pytest.mark.parametrize(
    ("vector", "coeff", "match"),
    [
        (float("nan"), 1.0, rf"The vector for {H1} holds 64 NaN and 0 Inf of its 64 values"),
        (float("inf"), 1.0, rf"The vector for {H1} holds 0 NaN and 64 Inf"),
        (1.0, float("nan"), rf"coeff nan for steering at {H1} is not finite"),
        (1.0, float("-inf"), rf"coeff -inf for steering at {H1} is not finite"),
        (
            1.0,
            torch.tensor([1.0, float("nan")]),
            rf"coeff tensor \[1\.0, nan\] for steering at {H1}",
        ),
    ],
)
def test_steer_refuses_nan_and_inf(tiny_lm, vector, coeff, match):
    """Bug caught: a NaN/Inf vector or coeff accepted by steer (every logit NaN, silently).
    The error is one line naming the hook, and the model is left unsteered."""
    model = tiny_lm.model
    base = logits(model)
    with pytest.raises(NonFiniteError, match=match) as e:
        with steer(model, {H1: torch.full((64,), vector)}, coeff=coeff):
            logits(model)
    assert "\n" not in str(e.value) and isinstance(e.value, SteerdiffError)
    torch.testing.assert_close(logits(model), base, rtol=0, atol=0)
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


def test_steer_takes_lists_and_numpy_arrays(tiny_lm):
    """Bug caught: a list or numpy vector raising AttributeError ('list' has no 'dim')."""
    import numpy as np

    model = tiny_lm.model
    v = rand_vec(model, H1)
    with steer(model, {H1: v}):
        want = logits(model)
    for given in (v.tolist(), v.numpy(), v.double().numpy()):
        with steer(model, {H1: given}):
            torch.testing.assert_close(logits(model), want, rtol=0, atol=0)
    with pytest.raises(HookError, match=rf"vector for {H1} is a dict; give a torch tensor"):
        with steer(model, {H1: {"x": 1}}):
            pass
    with pytest.raises(HookError, match=r"expected \(64,\)"):
        with steer(model, {H1: np.ones((2, 64))}):
            pass


def test_per_row_coeff_equals_separate_runs_and_checks_its_shape(tiny_lm):
    """Bug caught: a per-row coeff broadcast over the wrong axis (rows mixed up), or a
    tensor of the wrong length accepted."""
    model = tiny_lm.model
    v = rand_vec(model, H1, scale=2.0)
    ids = IDS[:1].expand(3, -1)
    with steer(model, {H1: v}, coeff=torch.tensor([0.0, 1.5, -3.0])):
        batched = logits(model, ids)
    for row, c in enumerate((0.0, 1.5, -3.0)):
        with steer(model, {H1: v}, coeff=c):
            torch.testing.assert_close(batched[row], logits(model, IDS[:1])[0], atol=1e-5, rtol=0)
    with pytest.raises(
        HookError, match=r"Per-row coeff has shape \(2,\) but this forward has batch 3"
    ):
        with steer(model, {H1: v}, coeff=torch.tensor([1.0, 2.0])):
            logits(model, ids)


def test_wrong_shape_says_expected(tiny_lm):
    with pytest.raises(HookError, match=r"expected \(32,\)"):
        with steer(tiny_lm.model, {"blocks.0.attn.hook_v": torch.zeros(64)}):
            pass


def test_bad_positions(tiny_lm):
    with pytest.raises(HookError, match="first:k"):
        with steer(tiny_lm.model, {"blocks.0.hook_resid_post": torch.zeros(64)}, positions="last"):
            pass


def test_unknown_family_error():
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.for_model(
        "gpt_neox",
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=64,
        vocab_size=64,
    )
    model = AutoModelForCausalLM.from_config(cfg)
    with pytest.raises(HookError, match=r"Unsupported model family 'gpt_neox'.*gemma3"):
        list_hook_points(model)


@pytest.mark.slow
def test_embedded_model_record_and_steer(smollm):
    model, tok = smollm.model, smollm.tokenizer
    ids = tok(["The owl sat on the branch."], return_tensors="pt").input_ids
    with record(model, ["blocks.5.hook_resid_post", "blocks.29.hook_resid_post"]) as rec:
        out = model(input_ids=ids, output_hidden_states=True)
    torch.testing.assert_close(
        rec["blocks.5.hook_resid_post"], out.hidden_states[6], rtol=0, atol=0
    )
    torch.testing.assert_close(
        final_norm(model)(rec["blocks.29.hook_resid_post"]), out.hidden_states[30], rtol=0, atol=0
    )
    v = torch.randn(576) * 4
    with steer(model, {"blocks.10.hook_resid_pre": v}):
        a = model(input_ids=ids).logits
    with steer(model, {"blocks.9.hook_resid_post": v}):
        b = model(input_ids=ids).logits
    torch.testing.assert_close(a, b)
