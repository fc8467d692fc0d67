"""Activation-difference lens: exact against a hand computation, zero for a zero vector,
adapters, the default corpus, and errors."""

from __future__ import annotations

import copy

import pytest
import torch
from _read_helpers import ByteTok

from steerdiff.hooks import record, steer
from steerdiff.interpret import LensError, LensResult, activation_difference_lens, save_lens
from steerdiff.interpret.corpus import CorpusError, load_corpus
from steerdiff.vectors import VectorSet, VectorSetError

TEXTS = ["hello there, world", "ab", "the quick brown fox jumps", "owls at night", "xyz"]
HOOKS = ["blocks.0.hook_resid_post", "blocks.1.attn.hook_q", "blocks.2.hook_resid_post"]


@pytest.fixture
def lm(tiny_lm):
    tiny_lm.tokenizer = ByteTok()
    return tiny_lm


def _vs(lm, scale=1.0):
    """A set at two hooks: the residual stream of block 1 and the values of block 2."""
    from steerdiff.hooks import hook_dim

    g = torch.Generator().manual_seed(1)
    names = ["blocks.1.hook_resid_pre", "blocks.2.attn.hook_v"]
    return VectorSet.for_model(
        lm, {n: scale * torch.randn(hook_dim(lm.model, n), generator=g) for n in names}
    )


def _hand(lm, vs, texts, k, max_tokens):
    """Mean diffs computed one text at a time, unbatched, no padding: at each hook and of
    the model's own final logits, per position (0..k-1) and over all positions."""
    m = lm.model
    hooks = [*HOOKS, "logits"]
    pos = {h: [[] for _ in range(k)] for h in hooks}
    allv = {h: [] for h in hooks}
    for t in texts:
        x = torch.tensor([lm.tokenizer(t)["input_ids"][:max_tokens]])
        with torch.no_grad(), record(m, HOOKS) as r0:
            l0 = m(x).logits
        with torch.no_grad(), record(m, HOOKS) as r1, steer(m, vs):
            l1 = m(x).logits
        diffs = {h: (r1[h] - r0[h])[0] for h in HOOKS} | {"logits": (l1 - l0)[0]}  # [L, dim]
        for h, d in diffs.items():
            for p in range(min(k, d.shape[0])):
                pos[h][p].append(d[p])
            allv[h].append(d)
    return (
        {h: torch.stack([torch.stack(pos[h][p]).mean(0) for p in range(k)]) for h in hooks},
        {h: torch.cat(allv[h]).mean(0) for h in hooks},
    )


def test_per_position_lens_equals_hand_computation(tiny):
    """Bug caught: padded positions counted in a mean (the final-logit mean was off by 0.019
    with them counted, 1e-7 without), a per-position mean over the wrong texts, or a mean
    difference at the wrong hook. Texts of different lengths in batches of 2: padding."""
    from steerdiff.models import wrap_model

    tiny.config.final_logit_softcapping = None  # gemma2: the lens reads pre-cap logits
    lm = wrap_model(tiny, ByteTok(), spec="tiny")
    vs = _vs(lm)
    res = activation_difference_lens(
        lm, TEXTS, vectors=vs, hooks=HOOKS, first_k=3, max_tokens=12, batch_size=2
    )
    hand_pos, hand_all = _hand(lm, vs, TEXTS, 3, 12)
    assert res.pos_count.tolist() == [5, 5, 4]  # "ab" and "xyz" are short
    assert res.n_tokens == sum(min(len(t), 12) for t in TEXTS)
    for h in HOOKS:
        assert res.pos_mean[h].shape == hand_pos[h].shape
        assert torch.allclose(res.pos_mean[h], hand_pos[h], atol=1e-4)
        assert torch.allclose(res.all_mean[h], hand_all[h], atol=1e-4)
    # blocks.0 is before the vector: no difference there
    assert res.all_mean["blocks.0.hook_resid_post"].abs().max() < 1e-5
    # the final-logit differences equal the means of the model's own logit differences
    lp, la = res.logit_diff(lm)
    assert lp.shape == (3, 256) and la.shape == (256,)
    torch.testing.assert_close(lp, hand_pos["logits"], rtol=0, atol=2e-5)
    torch.testing.assert_close(la, hand_all["logits"], rtol=0, atol=2e-5)
    ro = res.read(lm, k=4)
    assert {r.hook for r in ro.rows} == {"blocks.0.hook_resid_post", "blocks.2.hook_resid_post"}
    assert "blocks.1.attn.hook_q" in ro.skipped
    assert [r.position for r in ro.logits] == ["0", "1", "2", "all"]
    want_top = (la - la.mean()).topk(4).indices.tolist()
    assert [t.token_id for t in ro.logits[-1].top] == want_top


def test_logit_diff_matches_real_logits_for_one_text(lm):
    vs = _vs(lm)
    text = ["a single text of some length"]
    res = activation_difference_lens(
        lm, text, vectors=vs, hooks="blocks.2.hook_resid_post", first_k=2, max_tokens=10
    )
    x = torch.tensor([lm.tokenizer(text[0])["input_ids"][:10]])
    with torch.no_grad():
        l0 = lm.model(x).logits[0]
        with steer(lm.model, vs):
            l1 = lm.model(x).logits[0]
    lp, la = res.logit_diff(lm)
    assert torch.allclose(lp, (l1 - l0)[:2], atol=1e-4)
    assert torch.allclose(la, (l1 - l0).mean(0), atol=1e-4)


def test_lens_at_the_vectors_own_hook_is_the_vector(lm):
    """Bug caught: steering that never fires in the lens (a zero vector's lens, zero, would
    pass), coeff ignored, or padded positions counted in the all-position mean (it would
    shrink to v times the share of real tokens). Recorded where it is added, the mean
    difference is coeff * v at every position, and zero before the vector's layer."""
    g = torch.Generator().manual_seed(5)
    v = torch.randn(64, generator=g)
    hook = "blocks.1.hook_resid_pre"
    vs = VectorSet.for_model(lm, {hook: v})
    hooks = ["blocks.0.hook_resid_pre", hook, "blocks.2.hook_resid_pre"]
    res = activation_difference_lens(
        lm, TEXTS, vectors=vs, hooks=hooks, coeff=2.0, first_k=2, max_tokens=8, batch_size=3
    )
    torch.testing.assert_close(res.all_mean[hook], 2.0 * v, rtol=0, atol=1e-5)
    torch.testing.assert_close(res.pos_mean[hook], 2.0 * v.expand(2, 64), rtol=0, atol=1e-5)
    assert torch.equal(res.all_mean["blocks.0.hook_resid_pre"], torch.zeros(64))
    later = res.all_mean["blocks.2.hook_resid_pre"]
    assert float(later.norm()) > 0.1 * float(v.norm())  # it reaches the next block too
    assert res.n_tokens == sum(min(len(t), 8) for t in TEXTS)


def test_skip_first_and_save(lm, tmp_path):
    vs = _vs(lm)
    res = activation_difference_lens(
        lm, TEXTS, vectors=vs, hooks=HOOKS[2:], first_k=2, max_tokens=8, skip_first=1
    )
    assert res.n_tokens == sum(min(len(t), 8) - 1 for t in TEXTS)
    paths = save_lens(tmp_path, res, res.read(lm, k=3), lm, plot=True)
    assert paths["png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    back = LensResult.load(paths["pt"])
    assert torch.equal(back.all_mean[HOOKS[2]], res.all_mean[HOOKS[2]])


def test_finetuned_model_and_lora_adapter(lm, tmp_path):
    from peft import LoraConfig, get_peft_model

    # identical model: zero difference
    same = activation_difference_lens(
        lm, TEXTS, finetuned=copy.deepcopy(lm.model), hooks=HOOKS[2:], first_k=2, max_tokens=8
    )
    assert same.all_mean[HOOKS[2]].abs().max() < 1e-5
    # a LoRA adapter saved to a folder equals the merged model
    base = copy.deepcopy(lm.model)
    pm = get_peft_model(
        base, LoraConfig(r=2, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    )
    pm.save_pretrained(tmp_path / "adapter")
    merged = pm.merge_and_unload()
    a = activation_difference_lens(
        lm, TEXTS, finetuned=str(tmp_path / "adapter"), hooks=HOOKS[2:], first_k=2, max_tokens=8
    )
    b = activation_difference_lens(
        lm, TEXTS, finetuned=merged, hooks=HOOKS[2:], first_k=2, max_tokens=8
    )
    assert a.all_mean[HOOKS[2]].abs().max() > 1e-4
    assert torch.allclose(a.all_mean[HOOKS[2]], b.all_mean[HOOKS[2]], atol=1e-4)
    assert not any("lora" in n for n, _ in lm.model.named_modules())  # adapter removed again


def test_default_corpus_is_diverse():
    """Bug caught: a default corpus that lost texts or a genre (e.g. a bad rebuild)."""
    c = load_corpus()
    assert len(c) == 1200
    from collections import Counter

    assert Counter(c.genres) == {
        "drama": 300,
        "code": 250,
        "scripture": 250,
        "docs": 250,
        "dialogue": 150,
    }
    sub = load_corpus(n=20, seed=3)
    assert len(sub) == 20 and sub.texts == load_corpus(n=20, seed=3).texts


def test_bad_inputs(lm, tmp_path):
    vs = _vs(lm)
    with pytest.raises(CorpusError, match="no texts"):
        activation_difference_lens(lm, [], vectors=vs)
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    with pytest.raises(CorpusError, match="no texts"):
        load_corpus(str(empty))
    with pytest.raises(CorpusError, match="not found"):
        load_corpus(str(tmp_path / "missing.jsonl"))
    with pytest.raises(CorpusError, match="only 5"):
        load_corpus(TEXTS, n=6)
    with pytest.raises(LensError, match="longest text"):
        activation_difference_lens(lm, ["ab", "xyz"], vectors=vs, first_k=5, max_tokens=64)
    with pytest.raises(LensError, match="max_tokens"):
        activation_difference_lens(lm, TEXTS, vectors=vs, first_k=10, max_tokens=4)
    other = VectorSet(
        {"blocks.1.hook_resid_post": torch.randn(32)}, {"d_model": 32, "model_id": "other"}
    )
    with pytest.raises(VectorSetError, match="d_model"):
        activation_difference_lens(lm, TEXTS, vectors=other)
    with pytest.raises(LensError, match="exactly one"):
        activation_difference_lens(lm, TEXTS)


def test_cli_read_lens_writes_the_lens_of_the_vector(tmp_path):
    """Bug caught: `steerdiff read lens` (a README command) passing its options wrongly
    (--coeff, --first-k, --tokens, --hooks, --corpus, --n) or writing files that do not hold
    the lens. At the vector's own hook the mean difference is coeff * v."""
    import json

    from _read_helpers import tiny_model_folder
    from typer.testing import CliRunner

    from steerdiff.cli import app
    from steerdiff.interpret.dla import direct_logit_attribution
    from steerdiff.models import load_model

    folder = tiny_model_folder(tmp_path / "m")
    hook = "blocks.1.hook_resid_pre"
    v = torch.randn(64, generator=torch.Generator().manual_seed(3))
    vpath = VectorSet({hook: v}, {"d_model": 64}).save(tmp_path / "v.safetensors")
    texts = ["the owl sat", "numbers 1 2 3 4 5", "ok", "a longer line of plain text"]
    (tmp_path / "texts.txt").write_text("\n".join(texts) + "\n")
    # float32: the check that the difference at the vector's own hook is exactly coeff * v
    # (1e-5) needs it; in bfloat16 h + 2v is rounded (its norm 5e-4 off), by design
    lm = load_model(str(folder), dtype="float32")
    top = direct_logit_attribution(lm, 2.0 * v, hook, k=1).top[0].token
    out = tmp_path / "o"
    args = ["read", "lens", "--vectors", str(vpath), "--model", str(folder), "--out", str(out)]
    args += ["--dtype", "float32"]
    args += ["--corpus", str(tmp_path / "texts.txt"), "--n", "4", "--tokens", "8"]
    args += ["--first-k", "2", "--hooks", "blocks.{0,1}.hook_resid_pre", "--coeff", "2", "-k", "3"]
    r = CliRunner().invoke(app, [*args, "--find", top])
    assert r.exit_code == 0, r.output
    said = " ".join(r.stdout.split())  # rich wraps long lines
    hits = f"{hook}@0#1, {hook}@1#1, {hook}@all#1, logits@0#1, logits@1#1, logits@all#1"
    assert f"'{top}' in top 3: {hits}" in said
    info = json.loads((out / "lens.json").read_text())
    assert (info["n_texts"], info["n_tokens"], info["first_k"]) == (4, 2 + 8 + 8 + 8, 2)
    assert info["pos_count"] == [4.0, 4.0] and info["meta"]["coeff"] == 2.0
    rows = {(r["hook"], r["position"]): r for r in info["rows"]}
    assert rows[(hook, "all")]["diff_norm"] == pytest.approx(2.0 * float(v.norm()), rel=1e-5)
    assert rows[(hook, "all")]["top"][0]["token"] == top
    assert rows[("blocks.0.hook_resid_pre", "all")]["diff_norm"] == 0.0
    back = LensResult.load(out / "lens.pt")
    torch.testing.assert_close(back.all_mean[hook], 2.0 * v, rtol=0, atol=1e-5)
    csv_lines = (out / "lens.csv").read_text().splitlines()
    assert csv_lines[0] == "hook,position,diff_norm,top_tokens,bottom_tokens"
    assert len(csv_lines) == 1 + 2 * 3 + 3  # header, 2 hooks x (2 positions + all), logits
    assert (out / "lens_positions.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
