"""Faithfulness of vectors to a finetune (interpret.faithfulness, fit.faithful, `steerdiff read
faithfulness`): exact against hand computations on tiny random models, and the one-line error
for an adapter made for another base model."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch
from _read_helpers import ByteTok, one_line_error, tiny_model_folder

from steerdiff.adapters import AdapterError
from steerdiff.hooks import record, steer
from steerdiff.interpret import faithfulness
from steerdiff.intervals import bootstrap_ci
from steerdiff.merge import merge_vectors
from steerdiff.models import wrap_model
from steerdiff.teachers import TeacherError, load_adapted

TEXTS = ["hello there, world", "ab", "the quick brown fox jumps", "owls at night", "xyz 123"]
V_HOOK = "blocks.0.hook_resid_post"  # moves every later residual stream: a cosine everywhere
W_HOOK = "blocks.1.hook_resid_pre"
KW = dict(first_k=2, max_tokens=8, batch_size=2, n_boot=200)


@pytest.fixture
def lm(tiny_lm):
    tiny_lm.tokenizer = ByteTok()
    return tiny_lm


def _vec(seed: int, scale: float = 1.0) -> torch.Tensor:
    return scale * torch.randn(64, generator=torch.Generator().manual_seed(seed))


def _ids(text: str) -> torch.Tensor:
    return torch.tensor([ByteTok()(text)["input_ids"][:8]])


@torch.no_grad()
def _logp(model, x, vectors=None) -> torch.Tensor:
    with steer(model, vectors or {}):
        return torch.log_softmax(model(input_ids=x).logits[0].float(), -1)


def _kl_sums(pa: list[torch.Tensor], pb: list[torch.Tensor]) -> np.ndarray:
    """Per-text sums over tokens of KL(a || b) (float64)."""
    return np.array(
        [float((a.exp() * (a - b)).sum(-1).double().sum()) for a, b in zip(pa, pb, strict=True)]
    )


def _adapter(model, folder, seed: int = 0, base_name: str | None = None):
    """A PEFT LoRA on q/v/down projections with random B != 0 (init_lora_weights=False),
    saved to `folder`; returns the merged model (what the adapter does)."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    cfg = LoraConfig(r=2, target_modules=["q_proj", "v_proj", "down_proj"], init_lora_weights=False)
    pm = get_peft_model(copy.deepcopy(model), cfg)
    pm.save_pretrained(folder)
    if base_name is not None:
        path = folder / "adapter_config.json"
        cfg_json = json.loads(path.read_text())
        cfg_json["base_model_name_or_path"] = base_name
        path.write_text(json.dumps(cfg_json))
    return pm.merge_and_unload()


def _narrow_model_adapter(folder) -> None:
    """A LoRA adapter made for another base: a 32-wide llama named Org/Narrow-1B."""
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.for_model("llama", hidden_size=32, intermediate_size=64,
                               num_hidden_layers=3, num_attention_heads=4,
                               num_key_value_heads=2, vocab_size=256)  # fmt: skip
    narrow = AutoModelForCausalLM.from_config(cfg)
    narrow.name_or_path = "Org/Narrow-1B"
    _adapter(narrow, folder)


def test_a_model_with_itself_is_kl_zero_and_cosine_one(lm):
    """The finetune IS base + vectors (the vectors baked into biases, merge.merge_vectors): KL
    (finetune || vectors) is 0, the fraction explained is 1 and the cosine is 1 at every layer;
    and the base as its own finetune has KL 0 to base and no fraction (nothing to explain).
    Bug caught: a variant's context not entered (e.g. the finetune context yielding the base:
    mutation tried, resolve_finetune -> base_context: KL(finetune || vectors) 0.024, not 0)."""
    v = {V_HOOK: _vec(1)}
    merged = wrap_model(merge_vectors(lm, v), ByteTok(), spec="merged")
    res = faithfulness(lm, finetuned=merged, vectors=v, texts=TEXTS, **KW)
    assert res.kl_finetune_vectors.mean == pytest.approx(0.0, abs=1e-6)
    assert res.kl_finetune_base.mean == pytest.approx(res.kl_vectors_base.mean, rel=1e-5)
    assert res.kl_vectors_base.mean > 1e-3  # the vector does move the model
    assert res.fraction_explained == pytest.approx(1.0, abs=1e-4)
    assert res.layers == [0, 1, 2]
    assert res.cos_all == pytest.approx([1.0] * 3, abs=1e-5)
    assert res.cos_first_k == pytest.approx([1.0] * 3, abs=1e-5)
    assert res.norm_ratio_all == pytest.approx([1.0] * 3, abs=1e-4)
    same = faithfulness(lm, finetuned=lm, vectors=v, texts=TEXTS, **KW)
    assert same.kl_finetune_base.mean == pytest.approx(0.0, abs=1e-6)
    assert same.kl_finetune_base.ci95 == pytest.approx((0.0, 0.0), abs=1e-6)
    assert same.fraction_explained is None and same.cos_all == [None] * 3


def test_two_vector_sets_equal_hand_computations(lm):
    """vectors_b= takes the finetune's place: the same set gives KL 0 and cosine 1 at every
    layer; two different sets (other hooks) give KLs and per-layer cosines of mean
    activation differences equal to a direct computation under hooks.steer / record, text
    by text (and the vectors' own KL to base equals the hand value, 1e-5).
    Bug caught: the cosine over unnormalised or mismatched differences (mutation tried:
    _cos without dividing by |b| -> cosines off by |b|), KL direction swapped (mutation
    tried: KL(b || a) in variants.token_kls -> 0.02382 against the hand 0.02387)."""
    v, w = {V_HOOK: _vec(1)}, {W_HOOK: _vec(2, 2.0), V_HOOK: _vec(3, 0.5)}
    itself = faithfulness(lm, vectors_b=v, vectors=v, texts=TEXTS, **KW)
    assert itself.reference_kind == "vectors_b"
    for k in (itself.kl_finetune_base, itself.kl_vectors_base):
        assert k.mean == pytest.approx(itself.kl_vectors_base.mean, abs=1e-9)
    assert itself.kl_finetune_vectors.mean == pytest.approx(0.0, abs=1e-6)
    assert itself.cos_all == pytest.approx([1.0] * 3, abs=1e-6)
    assert itself.cos_first_k == pytest.approx([1.0] * 3, abs=1e-6)

    res = faithfulness(lm, vectors_b=w, vectors=v, texts=TEXTS, **KW)
    m = lm.model
    xs = [_ids(t) for t in TEXTS]
    base, pv, pw = ([_logp(m, x, s) for x in xs] for s in (None, v, w))
    n_tok = sum(x.shape[1] for x in xs)
    assert res.n_tokens == n_tok and res.n_texts == len(TEXTS)
    assert res.kl_vectors_base.mean == pytest.approx(_kl_sums(pv, base).sum() / n_tok, rel=1e-5)
    assert res.kl_finetune_base.mean == pytest.approx(_kl_sums(pw, base).sum() / n_tok, rel=1e-5)
    assert res.kl_finetune_vectors.mean == pytest.approx(_kl_sums(pw, pv).sum() / n_tok, rel=1e-5)
    # mean activation differences by hand: record under steer minus record without
    hooks = [f"blocks.{i}.hook_resid_post" for i in range(3)]
    all_cos, first_cos = [], []
    for h in hooks:
        diffs = {}
        for name, s in (("w", w), ("v", v)):
            per_tok, first = [], torch.zeros(2, 64, dtype=torch.float64)
            for x in xs:
                with record(m, [h]) as r0:
                    m(input_ids=x)
                with record(m, [h]) as r1, steer(m, s):
                    m(input_ids=x)
                d = (r1[h][0] - r0[h][0]).double()  # [L, 64]
                per_tok.append(d)
                first[: min(2, len(d))] += d[:2]
            counts = torch.tensor([sum(x.shape[1] > p for x in xs) for p in range(2)])
            diffs[name] = (torch.cat(per_tok).mean(0), first / counts[:, None])
        cos = torch.nn.functional.cosine_similarity
        all_cos.append(float(cos(diffs["w"][0], diffs["v"][0], dim=0)))
        first_cos.append(float(cos(diffs["w"][1].flatten(), diffs["v"][1].flatten(), dim=0)))
    assert res.cos_all == pytest.approx(all_cos, abs=1e-5)
    assert res.cos_first_k == pytest.approx(first_cos, abs=1e-5)
    assert min(all_cos) < 0.99  # different sets: not trivially 1


def test_lora_adapter_kl_and_fraction_explained_by_hand(lm, tmp_path):
    """A real PEFT LoRA (B != 0) applied from its folder: KL(finetune || base) equals the hand
    value from the merged adapter, the fraction explained is 1 - KL(ft||vec) / KL(ft||base)
    of those hand values, and its interval is the bootstrap over TEXTS of per-text sums
    (not over tokens); the base model has no LoRA layer left afterwards.
    Bug caught: the fraction as KL(vec||base) / KL(ft||base) (mutation tried: -> 0.03 off the
    hand value), an interval not of the ratio of per-text sums (mutation tried: the mean of
    per-text ratios -> the interval 0.02 off), the adapter left in the model (mutation tried: no unload -> lora modules)."""
    merged = _adapter(lm.model, tmp_path / "adapter")
    v = {V_HOOK: _vec(4, 0.5)}
    res = faithfulness(lm, finetuned=str(tmp_path / "adapter"), vectors=v, texts=TEXTS, **KW)
    assert not any("lora" in n for n, _ in lm.model.named_modules())
    xs = [_ids(t) for t in TEXTS]
    base = [_logp(lm.model, x) for x in xs]
    ft = [_logp(merged, x) for x in xs]
    vec = [_logp(lm.model, x, v) for x in xs]
    fb, fv = _kl_sums(ft, base), _kl_sums(ft, vec)
    n_tok = sum(x.shape[1] for x in xs)
    assert res.kl_finetune_base.mean == pytest.approx(fb.sum() / n_tok, rel=1e-4)
    assert res.kl_finetune_base.mean > 1e-3
    assert res.fraction_explained == pytest.approx(1.0 - fv.sum() / fb.sum(), abs=1e-5)
    want, _ = bootstrap_ci(lambda a, b: 1.0 - a.sum() / b.sum(), fv, fb, n_boot=200, seed=0)
    assert res.fraction_explained_ci == pytest.approx(want, abs=1e-4)
    d = res.to_dict()
    assert d["kl_finetune_base"]["mean"] == res.kl_finetune_base.mean
    assert d["reference_kind"] == "finetune" and "bootstrap over texts" in d["ci_method"]


def test_adapter_for_another_base_model_is_one_line(lm, tmp_path):
    """An adapter whose adapter_config.json names another base model, or whose LoRA shapes
    do not fit this model's modules: load_adapted and faithfulness fail in ONE line naming
    the adapter folder, the base it was made for, the model given and the fix.
    Bug caught: PEFT's own multi-line shape error (or a silent load of a same-shaped
    adapter) getting through (mutation tried: check_adapter_base returning early -> the
    renamed adapter loads without error and the wide one raises PEFT's size-mismatch text)."""
    _adapter(lm.model, tmp_path / "renamed", base_name="Org/Other-Model-7B")
    with pytest.raises(TeacherError) as e:  # a teacher's errors are TeacherErrors
        load_adapted(tmp_path / "renamed", lm)
    msg = str(e.value)
    assert "\n" not in msg
    assert str(tmp_path / "renamed") in msg and "Org/Other-Model-7B" in msg and "tiny-llama" in msg
    assert "base_model_name_or_path" in msg  # the fix for a renamed folder
    _narrow_model_adapter(tmp_path / "wide")
    for call in (
        lambda: load_adapted(tmp_path / "wide", lm),
        lambda: faithfulness(lm, finetuned=str(tmp_path / "wide"), vectors={V_HOOK: _vec(1)}, texts=TEXTS, **KW),
    ):  # fmt: skip
        with pytest.raises((AdapterError, TeacherError)) as e:
            call()
        msg = str(e.value)
        assert "\n" not in msg and str(tmp_path / "wide") in msg and "Org/Narrow-1B" in msg
        assert "down_proj is 64x128 here but the adapter's LoRA A is 2x64" in msg
        assert "retrain the adapter on this model" in msg
    assert not any("lora" in n for n, _ in lm.model.named_modules())


def test_heldout_losses_gap_closed_by_hand(lm):
    """fit.faithful.heldout_losses: CE per completion token of base, finetune and vectors equal
    a hand computation, and the gap closed is (CE_base - CE_vec) / (CE_base - CE_ft): 1 for
    a finetune that is base + the vectors, the hand value for another.
    Bug caught: the vectors not applied while scoring (mutation tried: no steer -> CE_vec =
    CE_base, gap 0), the ratio inverted (mutation tried: gap_figures(base, ft, vec))."""
    from steerdiff.fit.data import Example
    from steerdiff.fit.faithful import heldout_losses

    g = torch.Generator().manual_seed(5)
    exs = [
        Example(torch.randint(2, 256, (5,), generator=g).tolist(),
                torch.randint(2, 256, (4,), generator=g).tolist())
        for _ in range(6)
    ]  # fmt: skip
    v = {V_HOOK: _vec(1)}
    merged = wrap_model(merge_vectors(lm, v), ByteTok(), spec="merged")

    def hand_ce(model, vectors=None) -> float:
        tot, n = 0.0, 0
        for ex in exs:
            lp = _logp(model, torch.tensor([ex.prompt_ids + ex.completion_ids]), vectors)
            p = len(ex.prompt_ids)
            tgt = torch.tensor(ex.completion_ids)
            tot += float(-lp[p - 1 : -1].gather(1, tgt[:, None]).sum())
            n += len(tgt)
        return tot / n

    h = heldout_losses(lm, exs, finetuned=merged, vectors=v)
    assert h["ce_base"] == pytest.approx(hand_ce(lm.model), rel=1e-5)
    assert h["ce_vectors"] == pytest.approx(hand_ce(lm.model, v), rel=1e-5)
    assert h["ce_finetune"] == pytest.approx(hand_ce(lm.model, v), rel=1e-5)
    assert h["gap_closed"] == pytest.approx(1.0, abs=1e-4) and h["n_rows"] == 6
    half = {V_HOOK: 0.5 * v[V_HOOK]}
    h2 = heldout_losses(lm, exs, finetuned=merged, vectors=half)
    b, f, hv = hand_ce(lm.model), hand_ce(lm.model, v), hand_ce(lm.model, half)
    assert h2["gap_closed"] == pytest.approx((b - hv) / (b - f), rel=1e-4)
    lo, hi = h2["gap_closed_ci"]
    assert lo <= h2["gap_closed"] <= hi


def test_task_eval_side_by_side_preference(tmp_path):
    """The preference task for base, finetune and vectors: the paired per-question difference
    finetune - vectors is 0 for a finetune that is base + the vectors, and vectors - base
    equals evals.preference.paired_difference of the two evaluations done directly.
    Bug caught: the finetune evaluated as the base (mutation tried: ft_lm = lm -> finetune -
    vectors = base - vectors, not 0), differences unpaired or reversed."""
    from steerdiff.evals.preference import evaluate_preference, paired_difference
    from steerdiff.evals.steering import Steering
    from steerdiff.fit.faithful import task_eval_side_by_side
    from steerdiff.models import load_model

    lm = load_model(str(tiny_model_folder(tmp_path / "m")), dtype="float32")
    v = {V_HOOK: _vec(1, 3.0)}
    merged = wrap_model(merge_vectors(lm, v), lm.tokenizer, spec="merged")
    te = task_eval_side_by_side(lm, finetuned=merged, vectors=v, task="numbers", n_questions=2)
    assert te["finetune_minus_vectors"]["mean"] == pytest.approx(0.0, abs=1e-6)
    base = evaluate_preference(lm, "owl", n_questions=2)
    vec = evaluate_preference(lm, "owl", n_questions=2, steering=Steering(v))
    mean, ci = paired_difference(vec, base)
    assert te["vectors_minus_base"]["mean"] == pytest.approx(mean, abs=1e-6)
    assert te["vectors_minus_base"]["ci95"] == pytest.approx(list(ci), abs=1e-6)
    assert abs(mean) > 1e-4  # the vector moves the share: the check above is not 0 == 0
    assert te["finetune"]["target_rate"] == pytest.approx(vec.target_rate, abs=1e-6)


def test_task_eval_side_by_side_facts_uses_the_packaged_facts(smollm):
    """--task facts without a facts file takes the packaged set; the finetune (base + the
    vectors, merged) believes exactly what the vectors do, and vectors - base equals
    evals.beliefs.paired_beliefs of the two evaluations done directly.
    Bug caught: facts=None refused after the KLs had run (found on the CLI), or the facts
    file path handed to evaluate_beliefs unparsed. Mutation tried: the old `if facts is None:
    raise` -> FitError; the finetune evaluated as the base -> finetune - vectors != 0."""
    from _chat_tiny import make_tiny_chat

    from steerdiff.evals.beliefs import evaluate_beliefs, paired_beliefs
    from steerdiff.evals.facts_file import load_facts
    from steerdiff.evals.steering import Steering
    from steerdiff.fit.faithful import task_eval_side_by_side

    lm = make_tiny_chat(smollm.tokenizer, seed=3)
    v = {V_HOOK: _vec(1, 3.0)}
    merged = wrap_model(merge_vectors(lm, v), lm.tokenizer, spec="merged")
    te = task_eval_side_by_side(lm, finetuned=merged, vectors=v, task="facts")
    for kind in ("direct", "generalisation"):
        assert te["finetune_minus_vectors"][kind]["p_false"]["mean"] == pytest.approx(0, abs=1e-5)
    facts = load_facts()
    direct = paired_beliefs(
        evaluate_beliefs(lm, facts, steering=Steering(v)), evaluate_beliefs(lm, facts)
    )["direct"]["p_false"]
    got = te["vectors_minus_base"]["direct"]["p_false"]
    assert got["mean"] == pytest.approx(direct["mean"], abs=1e-6)
    assert abs(direct["mean"]) > 1e-4  # the vector moves p_false: the check is not 0 == 0
    assert got["n"] == sum(len(f.questions) for f in facts)


def test_cli_writes_faithfulness_json_and_fails_in_one_line(tmp_path):
    """`steerdiff read faithfulness MODEL --finetuned ADAPTER --vectors V` prints the figures
    and writes faithfulness.json (the library's numbers, with provenance) and the plot; an
    adapter for another base exits 2 with one line naming it, and an existing
    faithfulness.json is left as it was.
    Bug caught: options not reaching the library (mutation tried: --tokens ignored -> n_tokens
    differs), the error escaping as a traceback (mutation tried: a RuntimeError for that adapter -> the
    one-line check fails)."""
    from typer.testing import CliRunner

    from steerdiff.cli import app
    from steerdiff.models import load_model
    from steerdiff.vectors import VectorSet

    folder = tiny_model_folder(tmp_path / "m")
    lm = load_model(str(folder), dtype="float32")
    _adapter(lm.model, tmp_path / "adapter")
    vpath = VectorSet({V_HOOK: _vec(1)}, {"d_model": 64}).save(tmp_path / "v.safetensors")
    (tmp_path / "texts.txt").write_text("\n".join(TEXTS) + "\n")
    out = tmp_path / "o"
    args = ["read", "faithfulness", str(folder), "--finetuned", str(tmp_path / "adapter")]
    args += ["--vectors", str(vpath), "--corpus", str(tmp_path / "texts.txt"), "--n-texts", "5"]
    args += ["--tokens", "6", "--first-k", "2", "--dtype", "float32", "--out", str(out)]
    r = CliRunner().invoke(app, args)
    assert r.exit_code == 0, r.output
    info = json.loads((out / "faithfulness.json").read_text())
    want = faithfulness(
        lm, finetuned=str(tmp_path / "adapter"), vectors=VectorSet.load(vpath, lm),
        texts=str(tmp_path / "texts.txt"), n_texts=5, max_tokens=6, first_k=2,
    )  # fmt: skip
    assert info["n_tokens"] == want.n_tokens == sum(min(len(t), 6) for t in TEXTS)
    assert info["kl_finetune_base"]["mean"] == pytest.approx(want.kl_finetune_base.mean, rel=1e-6)
    assert info["fraction_explained"] == pytest.approx(want.fraction_explained, rel=1e-6)
    assert info["cos_all"] == pytest.approx(want.cos_all, abs=1e-6)
    assert info["provenance"]["weights_hash"] == lm.weights_hash
    assert (out / "faithfulness.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    said = " ".join(r.stdout.split())
    assert f"{want.fraction_explained:.3f}" in said and "KL(finetune || base)" in said

    (out / "faithfulness.json").write_text("old")
    _narrow_model_adapter(tmp_path / "wide")
    bad = [a if a != str(tmp_path / "adapter") else str(tmp_path / "wide") for a in args]
    line = one_line_error(CliRunner().invoke(app, bad))
    assert str(tmp_path / "wide") in line and "Org/Narrow-1B" in line
    assert (out / "faithfulness.json").read_text() == "old"
    line = one_line_error(CliRunner().invoke(app, [*args, "--vectors-b", str(vpath)]))
    assert "exactly one of --finetuned" in line
