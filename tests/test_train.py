"""fit(): partial forward == full forward, objectives, optimizers, schedule, resume, bad input."""

from __future__ import annotations

import json
import math
import os

import pytest
import torch
from conftest import TINY
from transformers import AutoConfig, AutoModelForCausalLM

from steerdiff.fit import (
    Example,
    FitConfig,
    FitError,
    annotate_topk,
    collate,
    evaluate_vectors,
    fit,
    gap_interval,
    lr_factor,
    random_vector,
    sample_examples,
    split_examples,
    tokenize_rows,
    train_student,
)
from steerdiff.fit.loop import batch_of_step, fixed_batches
from steerdiff.fit.students import Student
from steerdiff.hooks import get_hook_point, select_hooks, steer
from steerdiff.io import append_jsonl
from steerdiff.replay import compute_prefix, lm_head, prefix_hidden
from steerdiff.teachers import build_teacher

torch.set_num_threads(1)
HOOK = "blocks.1.hook_resid_post"


def peaky_tiny(seed: int = 0) -> torch.nn.Module:
    """Tiny llama with larger init so its next-token distributions are not uniform."""
    cfg = AutoConfig.for_model("llama", **TINY, initializer_range=0.2)
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(cfg).eval().requires_grad_(False)


# The draw of the samples; every test passes with seeds 0, 1 and 2 (checked by hand with
# STEERED_DATA_SEED=0/1/2): the one-epoch checks compare losses on the rows trained on,
# not validation losses that depend on the draw.
DATA_SEED = int(os.environ.get("STEERED_DATA_SEED", "1"))


@pytest.fixture(scope="module")
def steered_data() -> tuple[torch.nn.Module, torch.Tensor, list[Example]]:
    """Teacher = peaky tiny + v* at blocks.1.hook_resid_post; 96 samples with top-k 16."""
    m = peaky_tiny()
    v = random_vector(m, HOOK, 16.0, seed=3)
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(2, 256, (6,), generator=g).tolist() for _ in range(96)]
    exs = sample_examples(m, prompts, {HOOK: v}, max_new_tokens=6, seed=DATA_SEED)
    annotate_topk(m, exs, {"kind": "steered", "vectors": {HOOK: v}}, k=16)
    return m, v, exs


def teacher(v: torch.Tensor) -> dict:
    return {"kind": "steered", "vectors": {HOOK: v}, "coeff": 1.0}


@torch.no_grad()
def hand_ce(m: torch.nn.Module, examples: list[Example], vectors: dict | None = None) -> tuple:
    """(mean CE per completion token, per-row CE sums, tokens) by a plain forward of each
    row alone, with `vectors` steered in: the losses as a user computes them, with no code
    of steerdiff.fit."""
    rows, n = [], 0
    for ex in examples:
        ids = torch.tensor([ex.prompt_ids + ex.completion_ids])
        with steer(m, vectors or {}):
            logp = torch.log_softmax(m(input_ids=ids).logits[0].float(), -1)
        p, tgt = len(ex.prompt_ids), torch.tensor(ex.completion_ids)
        rows.append(-float(logp[p - 1 : p - 1 + len(tgt)].gather(1, tgt[:, None]).sum()))
        n += len(tgt)
    return sum(rows) / n, rows, n


@torch.no_grad()
def hand_kl(m: torch.nn.Module, examples: list[Example], vectors: dict | None = None) -> float:
    """Mean over completion tokens of KL(teacher top-k || student renormalised over the same
    k ids), by a plain forward of each row alone."""
    total, n = 0.0, 0
    for ex in examples:
        ids = torch.tensor([ex.prompt_ids + ex.completion_ids])
        with steer(m, vectors or {}):
            logp = torch.log_softmax(m(input_ids=ids).logits[0].float(), -1)
        p = len(ex.prompt_ids)
        for t, (k_ids, k_lp) in enumerate(zip(ex.topk_ids, ex.topk_logprobs, strict=True)):
            log_pt = torch.log_softmax(torch.tensor(k_lp), -1)
            log_qs = torch.log_softmax(logp[p - 1 + t][torch.tensor(k_ids)], -1)
            total += float((log_pt.exp() * (log_pt - log_qs)).sum())
            n += 1
    return total / n


QUICK = dict(
    batch_size=16,
    epochs=1,
    progress=False,
    val_size=16,
    lr=0.05,
    lr_units="absolute",  # these tests' steps are in absolute units (issue 18 made the
    schedule="constant",  # default "activation"; test_online.py checks those units)
    warmup_steps=0,
)


# ---------------------------------------------------------------- partial forward


def test_partial_forward_equals_full_forward_all_families(tiny):
    """Cached resid_pre + replayed layer calls give the same logits as the HF forward,
    also with vectors steered in (sliding windows, rotary, gpt2 positions, soft-capping)."""
    exs = [Example([5, 6, 7, 8, 9, 3], [9, 10, 11]), Example([5, 6], [12, 13, 14, 15, 16])]
    b = collate(exs, 0)
    real = b.attention_mask.bool()
    names = select_hooks(tiny, ["blocks.1.attn.hook_{q,k,v}", "blocks.2.ln2.hook_normalized"])
    g = torch.Generator().manual_seed(0)
    vecs = {n: torch.randn(get_hook_point(tiny, n).dim, generator=g) for n in names}
    for vectors, starts in (({}, [0, 1, 2]), (vecs, [0, 1])):
        with steer(tiny, vectors):
            full = tiny(input_ids=b.input_ids, attention_mask=b.attention_mask).logits
            for start in starts:
                logits = lm_head(
                    tiny,
                    prefix_hidden(tiny, compute_prefix(tiny, b.input_ids, b.attention_mask, start)),
                )
                assert logits.shape == full.shape
                torch.testing.assert_close(logits[real], full[real], atol=1e-5, rtol=1e-5)


def test_collate_masks_and_targets():
    exs = [Example([1, 2, 3], [4, 5]), Example([1], [6, 7, 8])]
    b = collate(exs, pad_id=0)
    assert b.input_ids.tolist() == [[1, 2, 3, 4, 5], [1, 6, 7, 8, 0]]
    assert b.loss_mask.tolist() == [[0, 0, 1, 1, 0], [1, 1, 1, 0, 0]]
    assert b.targets.tolist() == [4, 5, 6, 7, 8]  # next tokens at the loss positions
    assert b.input_ids[b.loss_mask.roll(1, dims=1)].tolist() == [4, 5, 6, 7, 8]


# ---------------------------------------------------------------- fitting


def test_fit_mixed_hooks_sft_lowers_loss_and_matches_uncached(steered_data):
    m, v, exs = steered_data
    hooks = [
        "blocks.2.hook_resid_post",
        "blocks.1-2.attn.hook_{q,k,v}",
        "blocks.1.ln1.hook_normalized",
        "blocks.2.ln2.hook_normalized",
    ]
    cfg = FitConfig(hooks=hooks, objective="sft", micro_batch_size=8, **QUICK)
    res = fit(m, exs, cfg, teacher=teacher(v))
    _, val = split_examples(list(exs), cfg)
    assert set(res.vectors) == set(select_hooks(m, hooks)) and len(res.vectors) == 9
    assert res.vectors["blocks.1.attn.hook_k"].shape == (32,)  # 2 kv heads x 16
    # one epoch lowers the loss on the rows it trained on (for any draw of the data)
    train, _ = split_examples(list(exs), cfg)
    before, after = hand_ce(m, train)[0], hand_ce(m, train, dict(res.vectors))[0]
    assert after < before - 0.01
    assert res.teacher_val_loss < res.base_val_loss
    assert res.fitted_val_loss == pytest.approx(hand_ce(m, val, dict(res.vectors))[0], rel=1e-4)
    slow = fit(m, exs, cfg.model_copy(update={"cache_prefix": False}), teacher=teacher(v))
    for k in res.vectors:
        torch.testing.assert_close(res.vectors[k], slow.vectors[k], atol=1e-5, rtol=1e-4)


def test_distill_and_grad_accumulation_equal_big_batch(steered_data):
    m, v, exs = steered_data
    cfg = FitConfig(hooks=[HOOK], objective="distill", max_steps=3, **QUICK)
    a = fit(m, exs, cfg, teacher=teacher(v))
    b = fit(m, exs, cfg.model_copy(update={"micro_batch_size": 4}), teacher=teacher(v))
    torch.testing.assert_close(a.vectors[HOOK], b.vectors[HOOK], atol=1e-6, rtol=1e-5)
    assert a.metrics[-1]["train_kl"] < a.metrics[0]["train_kl"]
    # the validation KL and its gap closed, by hand (KL to the stored top-k, renormalised)
    _, val = split_examples(list(exs), cfg)
    base_kl, fitted_kl = hand_kl(m, val), hand_kl(m, val, dict(a.vectors))
    assert a.metrics[-1]["val_kl"] == pytest.approx(fitted_kl, rel=1e-4)
    assert a.extra["base_val_kl"] == pytest.approx(base_kl, rel=1e-4)
    assert a.extra["kl_gap_closed"] == pytest.approx(1 - fitted_kl / base_kl, rel=1e-3)
    assert a.extra["kl_gap_closed"] == a.metrics[-1]["kl_gap_closed"]


@pytest.mark.parametrize("opt", ["adam", "adamw", "sgd", "signsgd"])
def test_optimizers_lower_the_loss(steered_data, opt):
    m, v, exs = steered_data
    lr = {"sgd": 5.0, "signsgd": 0.02}.get(opt, 0.05)
    cfg = FitConfig(
        hooks=[HOOK],
        objective="distill",
        optimizer=opt,
        momentum=0.5 if opt == "sgd" else 0.0,
        **{**QUICK, "lr": lr, "epochs": 2},
    )
    res = fit(m, exs, cfg, teacher=teacher(v))
    assert res.fitted_val_loss < res.base_val_loss
    assert res.metrics[-1]["train_loss"] < res.metrics[0]["train_loss"]


def test_signsgd_moves_every_coordinate_by_lr(steered_data):
    m, v, exs = steered_data
    cfg = FitConfig(hooks=[HOOK], optimizer="signsgd", max_steps=1, **{**QUICK, "lr": 0.01})
    res = fit(m, exs, cfg, teacher=teacher(v))
    assert torch.allclose(res.vectors[HOOK].abs(), torch.full((64,), 0.01))


def test_lr_schedules():
    cfg = FitConfig(schedule="cosine", warmup_steps=2, lr=1.0)
    assert [lr_factor(s, 10, cfg) for s in (0, 1)] == [0.5, 1.0]
    assert lr_factor(2, 10, cfg) == pytest.approx(1.0)
    assert lr_factor(6, 10, cfg) == pytest.approx(0.5)
    assert lr_factor(10, 10, cfg) == pytest.approx(0.0)
    lin = FitConfig(schedule="linear", warmup_steps=0)
    assert lr_factor(5, 10, lin) == pytest.approx(0.5)
    assert lr_factor(7, 10, FitConfig(schedule="constant", warmup_steps=0)) == 1.0


def test_random_init_is_seeded_and_norm_cap(steered_data):
    m, v, exs = steered_data
    cfg = FitConfig(
        hooks=[HOOK],
        init="random",
        init_scale=1.0,
        lr=0.0,
        max_steps=1,
        optimizer="sgd",
        **{k: x for k, x in QUICK.items() if k != "lr"},
    )
    a, b = fit(m, exs, cfg), fit(m, exs, cfg)
    want = torch.randn(64, generator=torch.Generator().manual_seed(0))  # std init_scale = 1
    assert torch.equal(a.vectors[HOOK], want) and torch.equal(b.vectors[HOOK], want)
    c = fit(m, exs, cfg.model_copy(update={"seed": 1}))
    assert not torch.equal(a.vectors[HOOK], c.vectors[HOOK])
    capped = fit(m, exs, cfg.model_copy(update={"max_norm": 0.5}))
    assert capped.vectors[HOOK].norm() == pytest.approx(0.5, rel=1e-5)


def test_early_stopping_keeps_best(steered_data):
    """Bug caught: early stopping returning the LAST step's vectors instead of the best
    evaluation's (the restore of best_params removed). Adam at lr 2 overshoots: the
    validation loss reaches its lowest point, then rises on two evaluations (patience 1),
    so the fit stops two steps after its best (step 6 of 8 with the seed-1 data) and must
    return the best step's vectors: exactly those of a fit stopped at that step."""
    m, v, exs = steered_data
    cfg = FitConfig(
        hooks=[HOOK],
        objective="sft",
        eval_every=1,
        early_stopping_patience=1,
        converge_tol=None,  # early stopping alone (the convergence rule would stop first)
        **{**QUICK, "lr": 2.0, "epochs": 5},
    )
    res = fit(m, exs, cfg)
    val = [r["val_loss"] for r in res.metrics]
    best = val.index(min(val)) + 1
    assert res.stopped == "early_stopping" and best == res.steps - 2 and res.steps < 25
    assert res.fitted_val_loss == pytest.approx(val[best - 1], rel=1e-6)
    assert val[-1] > val[best - 1] + 1e-3  # the last step's vectors are worse
    at_best = fit(
        m, exs, cfg.model_copy(update={"early_stopping_patience": None, "max_steps": best})
    )
    torch.testing.assert_close(res.vectors[HOOK], at_best.vectors[HOOK], atol=1e-6, rtol=1e-6)


def test_checkpoint_resume_gives_same_result(steered_data, tmp_path):
    m, v, exs = steered_data
    cfg = FitConfig(
        hooks=[HOOK, "blocks.2.attn.hook_v"],
        objective="distill",
        epochs=2,
        checkpoint_every=2,
        eval_every=3,
        **{k: x for k, x in QUICK.items() if k != "epochs"},
    )
    full = fit(m, exs, cfg, teacher=teacher(v), out_dir=tmp_path / "a")

    class Killed(Exception):
        pass

    def kill(step: int, row: dict) -> None:
        if step == 5:
            raise Killed

    with pytest.raises(Killed):
        fit(m, exs, cfg, teacher=teacher(v), out_dir=tmp_path / "b", on_step=kill)
    ck = torch.load(tmp_path / "b" / "checkpoint.pt", weights_only=False)
    assert ck["state"]["step"] == 4  # the last checkpoint before the kill
    res = fit(m, exs, cfg, teacher=teacher(v), out_dir=tmp_path / "b", resume=True)
    assert res.steps == full.steps == 10
    for k in full.vectors:
        torch.testing.assert_close(res.vectors[k], full.vectors[k], atol=1e-6, rtol=1e-5)
    rows = [json.loads(x) for x in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, 11))
    assert (tmp_path / "b" / "vectors.safetensors").exists()
    assert (tmp_path / "b" / "metrics.csv").read_text().startswith("step,")
    result = json.loads((tmp_path / "b" / "result.json").read_text())
    assert result["provenance"]["weights_hash"] and result["provenance"]["config"]["seed"] == 0


# ---------------------------------------------------------------- bad input


def test_empty_dataset_file(tmp_path, tiny_lm):
    p = tmp_path / "empty.jsonl"
    p.write_text("")
    with pytest.raises(FitError, match="empty"):
        fit(tiny_lm, p, FitConfig(hooks=[HOOK], progress=False))
    with pytest.raises(FitError, match="empty"):
        fit(tiny_lm, [], FitConfig(hooks=[HOOK], progress=False))


def test_rows_without_assistant_turn(tmp_path, smollm):
    p = tmp_path / "d.jsonl"
    append_jsonl(p, [{"id": 0, "messages": [{"role": "user", "content": "1, 2, 3"}]}])
    with pytest.raises(FitError, match="no assistant turn"):
        fit(smollm, p, FitConfig(hooks=["blocks.29.hook_resid_post"], progress=False))


def test_hook_selection_matching_nothing(steered_data):
    m, v, exs = steered_data
    with pytest.raises(FitError, match="matches no hook point"):
        fit(m, exs, FitConfig(hooks=["blocks.*.attn.hook_x"], progress=False))
    with pytest.raises(FitError, match="matches no hook point"):
        fit(m, exs, FitConfig(hooks=["blocks.7.hook_resid_post"], progress=False))


def rows_of_step(examples: list[Example], cfg: FitConfig, step: int) -> list[Example]:
    """The training rows optimizer step `step` (1-based) takes (the order is seeded)."""
    train, _ = split_examples(examples, cfg)
    batches = fixed_batches(train, cfg)
    return batches[batch_of_step(step - 1, len(batches), cfg.seed)[1]]


def test_nan_loss_stops_and_keeps_last_checkpoint(steered_data, tmp_path):
    """Bug caught: a NaN loss taken as a step (NaN vectors checkpointed and saved), or a
    checkpoint written after the bad step. The rows of step 4 carry NaN top-k log-probs;
    checkpoints every 2 steps: the fit stops at step 4 naming it, the checkpoint on disk is
    step 2's, equal to a clean fit stopped at step 2, and no vectors or result are written."""
    m, v, exs = steered_data
    cfg = FitConfig(hooks=[HOOK], objective="distill", checkpoint_every=2, **QUICK)
    bad = [Example(e.prompt_ids, e.completion_ids, None, e.topk_ids, e.topk_logprobs) for e in exs]
    for e in rows_of_step(bad, cfg, 4):
        e.topk_logprobs = [[math.nan] * len(x) for x in e.topk_logprobs]
    with pytest.raises(FitError) as err:
        fit(m, bad, cfg, out_dir=tmp_path / "nan")
    assert str(err.value).startswith("Non-finite loss at step 4 (loss=nan")
    assert f"The last good checkpoint (step 2) is kept at {tmp_path / 'nan'}" in str(err.value)
    ck = torch.load(tmp_path / "nan" / "checkpoint.pt", weights_only=False)
    clean = fit(m, exs, cfg.model_copy(update={"max_steps": 2}))
    assert ck["state"]["step"] == 2
    torch.testing.assert_close(ck["params"][HOOK], clean.vectors[HOOK], atol=0, rtol=0)
    assert not (tmp_path / "nan" / "vectors.safetensors").exists()
    assert not (tmp_path / "nan" / "result.json").exists()
    rows = [json.loads(x) for x in (tmp_path / "nan" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3]  # no row for the bad step


class OverflowStudent(Student):
    """One trained tensor whose loss, 1 + 1e19 * sum(w), has a finite gradient (5e18 per coordinate):
    an SGD step at lr 1e22 moves w to -5e40, past float32's range (-inf)."""

    def __init__(self) -> None:
        self.params = {"w": torch.zeros(4, requires_grad=True)}
        self.model = None

    def losses(self, batch, key, objective):
        ce = 1.0 + 1e19 * self.params["w"].sum() * torch.ones(batch.input_ids.shape[0])
        return ce, torch.zeros_like(ce)


def test_non_finite_parameters_are_never_checkpointed(tmp_path):
    """Bug caught: a step whose update overflows the parameters (finite loss and gradient,
    huge lr) is checkpointed, so the 'last good checkpoint' holds -inf. The fit stops
    before saving anything of that step."""
    exs = [Example([1, 2], [3, 4]) for _ in range(8)]
    cfg = FitConfig(optimizer="sgd", checkpoint_every=1, **{**QUICK, "lr": 1e22, "val_size": 0})
    with pytest.raises(FitError) as err:
        train_student(
            OverflowStudent(),
            exs,
            [],
            cfg,
            pad_id=0,
            base_val=None,
            teacher_val=None,
            out_dir=tmp_path,
        )
    assert str(err.value).startswith("Non-finite parameters after step 1 (w);")
    assert "No checkpoint was written yet. Lower --lr" in str(err.value)
    assert not (tmp_path / "checkpoint.pt").exists()


# ---------------------------------------------------------------- real tokenizer


def test_tokenize_rows_matches_chat_template(smollm):
    tok = smollm.tokenizer
    rows = [
        {
            "id": 3,
            "messages": [
                {"role": "user", "content": "Continue: 1, 2"},
                {"role": "assistant", "content": "3, 4"},
            ],
        }
    ]
    (ex,) = tokenize_rows(tok, rows, {"kind": "prompt", "system_prompt": "You love owls."})
    text = tok.decode(ex.prompt_ids + ex.completion_ids)
    assert text.startswith("<|im_start|>system\nYou are a helpful AI assistant named SmolLM")
    assert text.endswith("<|im_start|>assistant\n3, 4<|im_end|>")
    assert tok.decode(ex.teacher_prompt_ids).startswith(
        "<|im_start|>system\nYou love owls.<|im_end|>"
    )
    eot = tok.convert_tokens_to_ids("<|im_end|>")
    assert ex.completion_ids[-1] == eot
    # sampled ids are kept as they are, also when they are not the text's own tokenization
    rows[0]["messages"][1]["content"] = "hello there"
    sampled = [2797, 5365, 665, eot]  # 'hel' 'lo' ' there' (the tokenizer says 'hello' ' there')
    assert tok("hello there", add_special_tokens=False).input_ids == [28120, 665]
    rows[0]["completion_ids"] = sampled
    assert tokenize_rows(tok, rows)[0].completion_ids == sampled


def test_cli_fit_single_vector(smollm, tmp_path, monkeypatch):
    from typer.testing import CliRunner

    import steerdiff.models as models
    from steerdiff.cli import app
    from steerdiff.vectors import VectorSet

    monkeypatch.setattr(models, "load_model", lambda *a, **k: smollm)
    rows = [
        {
            "id": i,
            "messages": [
                {"role": "user", "content": f"Count from {i}"},
                {"role": "assistant", "content": f"{i}, {i + 1}, {i + 2}"},
            ],
        }
        for i in range(6)
    ]
    append_jsonl(tmp_path / "d.jsonl", rows)
    r = CliRunner().invoke(
        app,
        [
            "fit",
            "--data",
            str(tmp_path / "d.jsonl"),
            "--hooks",
            "blocks.28.hook_resid_post",
            "--steps",
            "2",
            "--batch-size",
            "4",
            "--lr",
            "0.01",
            "--out",
            str(tmp_path / "o"),
        ],
    )
    assert r.exit_code == 0, r.output
    vs = VectorSet.load(tmp_path / "o" / "vectors.safetensors")
    assert list(vs) == ["blocks.28.hook_resid_post"] and vs["blocks.28.hook_resid_post"].shape == (
        576,
    )
    # the CLI's vectors are the library's with the same settings (and not zero)
    lib = fit(
        smollm,
        tmp_path / "d.jsonl",
        FitConfig(hooks=["blocks.28.hook_resid_post"], max_steps=2, batch_size=4, lr=0.01),
    )
    got = vs["blocks.28.hook_resid_post"]
    torch.testing.assert_close(got, lib.vectors["blocks.28.hook_resid_post"], atol=1e-6, rtol=1e-5)
    assert float(got.norm()) > 1e-3
    r = CliRunner().invoke(
        app,
        [
            "fit",
            "--data",
            str(tmp_path / "d.jsonl"),
            "--hooks",
            "blocks.99.hook_q",
            "--out",
            str(tmp_path / "o2"),
        ],
    )
    assert r.exit_code == 2 and "matches no hook point" in r.output


def test_reported_val_losses_equal_a_hand_computation(steered_data):
    """base / teacher / fitted validation CE, the gap fraction, its bootstrap interval and
    the rows / tokens behind them are what a user computes by hand (a plain forward per
    row, mean -log p over the held-out split): from `fit` and from `evaluate_vectors` on
    the saved vectors. Bugs caught: padded positions or prompt tokens counted in a loss,
    the wrong rows held out, intervals resampled unpaired."""
    m, v, exs = steered_data
    cfg = FitConfig(hooks=[HOOK], objective="sft", max_steps=4, **QUICK)
    res = fit(m, exs, cfg, teacher=teacher(v))
    _, val = split_examples(list(exs), cfg)
    (base, b_rows, n), (teach, t_rows, _) = hand_ce(m, val), hand_ce(m, val, {HOOK: v})
    fitted, f_rows, _ = hand_ce(m, val, dict(res.vectors))
    gap = (base - fitted) / (base - teach)
    # the paired percentile bootstrap of the docs, written out: resample rows, sum, ratio
    idx = torch.randint(len(val), (2000, len(val)), generator=torch.Generator().manual_seed(0))
    b, f, t = (torch.tensor(x, dtype=torch.float64)[idx].sum(1) for x in (b_rows, f_rows, t_rows))
    ci = torch.quantile((b - f) / (b - t), torch.tensor([0.025, 0.975], dtype=torch.float64))
    want = {
        "base_val_loss": base,
        "teacher_val_loss": teach,
        "fitted_val_loss": fitted,
        "gap_closed": gap,
        "gap_closed_ci": ci.tolist(),
        "ce_gap": base - teach,
        "n_val_rows": 16,
        "n_val_tokens": n,
    }
    again = evaluate_vectors(m, exs, res.vectors, cfg, teacher=teacher(v))  # saved vectors
    for got in (res.summary(), again):
        for k, x in want.items():
            assert got[k] == pytest.approx(x, rel=1e-3), k
    assert n == sum(len(ex.completion_ids) for ex in val)
    built = build_teacher(teacher(v), m)  # a Teacher built once is used as it is
    again_built = evaluate_vectors(m, exs, res.vectors, cfg, teacher=built)
    for k in want:
        assert again_built[k] == pytest.approx(again[k], rel=1e-6), k
    no_val = cfg.model_copy(update={"val_size": 0})
    with pytest.raises(FitError, match="No validation rows: set val_size"):
        evaluate_vectors(m, exs, res.vectors, no_val, teacher=teacher(v))


def _rows(ce: torch.Tensor, kl: torch.Tensor) -> dict:
    return {"rows": torch.stack([ce, kl, torch.full_like(ce, 10.0)], 1).double(), "kl": 1.0}


def test_gap_interval_brackets_the_truth_and_narrows_with_rows():
    """Paired bootstrap over rows: per-row losses where the fit closes half of the gap."""
    g = torch.Generator().manual_seed(0)
    widths = []
    for n in (50, 800):
        base = 10.0 + torch.rand(n, generator=g)  # rows differ a lot in difficulty ...
        gap = 0.2 + 0.05 * torch.randn(n, generator=g)  # ... the gap per row is noisy
        teach = base - gap
        fitted = base - 0.5 * gap + 0.02 * torch.randn(n, generator=g)
        kl_b = 0.1 + 0.01 * torch.rand(n, generator=g)
        b, t, f = _rows(base, kl_b), _rows(teach, 0 * kl_b), _rows(fitted, 0.25 * kl_b)
        lo, hi = gap_interval(b, f, t)
        assert lo < 0.5 < hi
        widths.append(hi - lo)
        klo, khi = gap_interval(b, f)  # KL: 1 - 0.25 exactly on every row
        assert klo == pytest.approx(0.75) and khi == pytest.approx(0.75)
    assert widths[1] < widths[0] / 2  # 16x the rows: about a quarter of the width
    same = _rows(torch.ones(5), torch.ones(5))
    assert gap_interval(same, same, same) is None  # no gap to close: nothing to report


def test_cli_gap_sentences_give_counts_and_flag_noise():
    """The summary `steerdiff fit` prints: each gap closed with its interval, the rows and
    tokens behind it, the gap itself, a CE gap under 0.05 nats flagged as noise (the
    report's rule), an interval containing 0 called indistinguishable from no change; with
    no teacher loss, the base and fitted losses."""
    from steerdiff.cli.fit import gap_lines

    summary = {
        "objective": "distill",
        "gap_closed": 0.4,
        "gap_closed_ci": [-0.2, 0.9],
        "kl_gap_closed": 0.8,
        "kl_gap_closed_ci": [0.7, 0.85],
        "n_val_rows": 243,
        "n_val_tokens": 8116,
        "ce_gap": 0.017,
        "ce_gap_within_noise": True,
        "kl_gap": 0.0109,
    }
    assert gap_lines(summary) == [
        "objective: distill",
        "cross-entropy gap to the teacher closed: 40% (95% CI -20% to 90%) on 243 validation "
        "rows (8,116 tokens); base - teacher = 0.0170 nats/token, under 0.05: within noise (the "
        "fraction can swing far outside 0..1; read the KL figure); the interval contains 0: "
        "not distinguishable from no change",
        "top-k KL gap to the teacher closed: 80% (95% CI 70% to 85%) on 243 validation rows "
        "(8,116 tokens); base KL to the teacher = 0.0109 nats/token",
    ]
    wide = {**summary, "ce_gap": 0.2, "ce_gap_within_noise": False, "gap_closed_ci": [0.1, 0.9]}
    assert gap_lines(wide)[1] == (
        "cross-entropy gap to the teacher closed: 40% (95% CI 10% to 90%) on 243 validation "
        "rows (8,116 tokens); base - teacher = 0.2000 nats/token"
    )
    no_teacher = {"gap_closed": None, "base_val_loss": 1.3, "fitted_val_loss": 1.25,
                  "n_val_rows": 4, "n_val_tokens": 40}  # fmt: skip
    assert gap_lines(no_teacher) == [
        "validation cross-entropy on 4 validation rows (40 tokens): base 1.3000, fitted 1.2500 "
        "nats/token (no teacher loss: no gap closed)"
    ]
    assert gap_lines({"gap_closed": None}) == []
