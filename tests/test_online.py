"""Online distillation (fit.online), learning rate in activation units, the convergence stop
and the fitted-vs-teacher figures, on tiny random models."""

from __future__ import annotations

import math

import pytest
import torch
from test_train import HOOK, peaky_tiny

from steerdiff.fit import Example, FitConfig, FitError, fit, random_vector, sample_examples
from steerdiff.fit.data import collate
from steerdiff.fit.online import OnlineTeacher, online_losses
from steerdiff.fit.optim import make_optimizer
from steerdiff.fit.students import VectorStudent, init_vectors
from steerdiff.hooks import steer
from steerdiff.replay import full_hidden
from steerdiff.teachers import build_teacher

torch.set_num_threads(1)

QUICK = dict(
    progress=False, batch_size=8, val_size=4, schedule="constant", warmup_steps=0, hooks=[HOOK]
)


def steered(v: torch.Tensor) -> dict:
    return {"kind": "steered", "vectors": {HOOK: v}, "coeff": 1.0, "positions": "all"}


@pytest.fixture(scope="module")
def planted() -> tuple[torch.nn.Module, torch.Tensor, list[Example]]:
    """peaky tiny + v* (|v*| 8) at blocks.1.hook_resid_post; 24 sampled completions."""
    m = peaky_tiny()
    v = random_vector(m, HOOK, 8.0, seed=3)
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(2, 256, (6,), generator=g).tolist() for _ in range(24)]
    return m, v, sample_examples(m, prompts, {HOOK: v}, max_new_tokens=6, seed=0)


@torch.no_grad()
def hand_online_kl(m, rows, v_teacher, v_student, prompt_positions=False) -> list[float]:
    """Per row: sum over completion predictions (and, with prompt_positions, over every
    prediction) of KL(softmax(teacher logits) || softmax(student logits)), full vocabulary,
    from plain HF forwards of each row alone, no steerdiff.fit code."""
    out = []
    for ex in rows:
        ids = torch.tensor([ex.prompt_ids + ex.completion_ids])
        with steer(m, {HOOK: v_teacher}):
            lp = torch.log_softmax(m(input_ids=ids).logits[0].float(), -1)
        with steer(m, {HOOK: v_student}):
            lq = torch.log_softmax(m(input_ids=ids).logits[0].float(), -1)
        first = 0 if prompt_positions else len(ex.prompt_ids) - 1
        kl = (lp.exp() * (lp - lq)).sum(-1)[first : ids.shape[1] - 1]
        out.append(float(kl.sum()))
    return out


@pytest.mark.parametrize("prompt_positions", [False, True])
def test_online_loss_is_the_kl_of_teacher_and_student_logits(planted, prompt_positions):
    """Bug caught: a KL with p and q swapped, over the top-k only, at shifted positions
    (logits at t scored against the teacher's at t+1), or prompt positions dropped or
    kept wrongly: the loss then differs from KL(teacher || student) computed directly."""
    m, v, exs = planted
    rows = exs[:5]
    u = random_vector(m, HOOK, 5.0, seed=9)
    teacher = OnlineTeacher(build_teacher(steered(v), m), 0, prompt_positions)
    batch = collate(rows, 0)
    with steer(m, {HOOK: u}):
        hidden = full_hidden(m, batch.input_ids, batch.attention_mask)
    ce, kl = online_losses(m, hidden, batch, teacher.target(rows, torch.device("cpu")))
    want = hand_online_kl(m, rows, v, u, prompt_positions)
    torch.testing.assert_close(kl, torch.tensor(want), rtol=1e-4, atol=1e-5)
    assert float(kl.min()) > 1e-3  # a real gap: the check above is not 0 == 0


def test_teacher_equal_to_student_gives_zero_loss_and_zero_gradient(planted):
    """Bug caught: the teacher's target computed with gradients, or the student compared
    with another distribution (the base, a sample): then the loss or the gradient at the
    teacher's own vector is not 0."""
    m, v, exs = planted
    rows = exs[:6]
    student = VectorStudent(m, {HOOK: v.clone().requires_grad_(True)}, FitConfig(hooks=[HOOK]))
    teacher = OnlineTeacher(build_teacher(steered(v), m), 0)
    batch = collate(rows, 0)
    target = teacher.target(rows, torch.device("cpu"))
    assert not target.logp.requires_grad
    _, kl = student.losses(batch, None, "online", target)
    kl.sum().backward()
    assert float(kl.abs().max()) < 1e-5
    assert float(student.params[HOOK].grad.norm()) < 1e-5


def test_online_distillation_recovers_the_planted_vector(planted):
    """Bug caught: the online target taken from the student (no teacher steering), a sign
    error in the KL's gradient, or lr units that stall the vector: cosine stays low."""
    m, v, exs = planted
    res = fit(m, exs, objective="online", teacher=steered(v), lr=0.1, epochs=60, **QUICK)
    vv = res.extra["vector_vs_teacher"][HOOK]
    assert res.extra["objective"] == "online"
    assert vv["cosine"] >= 0.99
    assert vv["fitted_norm"] == pytest.approx(8.0, rel=0.05)
    assert res.extra["kl_gap_closed"] > 0.99


def test_auto_is_online_with_a_steered_teacher_and_online_needs_one(planted):
    """Bug caught: auto not choosing online for a teacher that can run, or online silently
    running against no teacher (a plain one: KL 0 everywhere, nothing learnt)."""
    m, v, exs = planted
    res = fit(m, exs, teacher=steered(v), max_steps=1, **QUICK)
    assert res.extra["objective"] == "online"
    with pytest.raises(FitError, match="objective 'online' needs a teacher.*teacher=") as e:
        fit(m, exs, objective="online", max_steps=1, **QUICK)
    assert "there is none" in str(e.value)


def test_prompt_positions_need_the_same_prompt(planted):
    """Bug caught: the KL at prompt positions taken for a teacher with another prompt
    (its prompt positions predict other tokens): must be a FitError naming the option."""
    m, v, exs = planted
    other = [Example(ex.prompt_ids, ex.completion_ids, [1, *ex.prompt_ids]) for ex in exs]
    with pytest.raises(FitError, match="online_prompt_positions.*another prompt"):
        fit(
            m,
            other,
            objective="online",
            teacher=steered(v),
            online_prompt_positions=True,
            max_steps=1,
            **QUICK,
        )


@pytest.mark.parametrize(
    ("optimizer", "power"), [("adam", 1), ("adamw", 1), ("signsgd", 1), ("sgd", 2)]
)
def test_lr_units_scale_each_hooks_step(optimizer, power):
    """Bug caught: one lr for every hook in activation units (the scale not applied, or
    applied as s for SGD where training u = v/s needs s^2): the first step of each hook
    must be the absolute step times s^power."""
    m = peaky_tiny()
    hooks = ["blocks.0.hook_resid_post", "blocks.1.attn.hook_q"]
    scales = {hooks[0]: 3.0, hooks[1]: 0.25}
    cfg = FitConfig(hooks=hooks, optimizer=optimizer, lr=0.01)
    steps = {}
    for sc in (None, scales):
        params = init_vectors(m, hooks, cfg)
        opt = make_optimizer(params, cfg, sc)
        for name, p in params.items():
            p.grad = torch.linspace(-1, 1, p.numel()) * (2.0 if "attn" in name else 1.0)
        opt.step()
        steps[sc is None] = {k: p.detach().clone() for k, p in params.items()}
    for h in hooks:
        torch.testing.assert_close(steps[False][h], steps[True][h] * scales[h] ** power)


def test_activation_scales_are_the_hooks_rms(planted):
    """Bug caught: the scale measured on the wrong hook, with the steering on, or as the
    norm instead of the RMS per coordinate: result.json's lr_scale must be mean |a|/sqrt(d)
    of the base model's activations on the first SCALE_ROWS training rows in the fit's
    order (first token of each row left out)."""
    m, v, exs = planted
    res = fit(m, exs, objective="sft", max_steps=1, **QUICK)
    from steerdiff.fit.data import split_examples
    from steerdiff.fit.loop import SCALE_ROWS, fixed_batches
    from steerdiff.hooks import record

    cfg = FitConfig(**QUICK)
    train, _ = split_examples(exs, cfg)
    first = [ex for rows in fixed_batches(train, cfg) for ex in rows][:SCALE_ROWS]
    b = collate(first, 0)
    with record(m, [HOOK]) as rec:
        m(input_ids=b.input_ids, attention_mask=b.attention_mask)
    real = b.attention_mask.bool()
    real[:, 0] = False
    a = rec[HOOK][real]
    want = float(a.norm(dim=-1).mean()) / math.sqrt(a.shape[-1])
    assert res.extra["lr_units"] == "activation"
    assert res.extra["lr_scale"][HOOK] == pytest.approx(want, rel=1e-4)


def test_convergence_stops_and_is_recorded(planted, tmp_path):
    """Bug caught: the convergence rule never firing (a fit runs all its epochs) or firing
    without being recorded, or a resumed converged fit training on: stopped must read
    "converged", before the epoch bound, and a resume must end at the same step."""
    m, v, exs = planted
    kw = dict(objective="online", teacher=steered(v), lr=0.1, epochs=200, **QUICK)
    res = fit(m, exs, out_dir=tmp_path, converge_tol=0.01, **kw)
    assert res.stopped == "converged"
    n_batches = math.ceil(20 / 8)
    assert res.steps < 200 * n_batches
    crits = [r["val_kl"] for r in res.metrics if "val_kl" in r]
    assert min(crits[:-2]) - min(crits[-2:]) < 0.01 * min(crits[:-2])  # the rule, as documented
    assert min(crits[:-3]) - min(crits[-3:-1]) >= 0.01 * min(crits[:-3])  # not one eval before
    again = fit(m, exs, out_dir=tmp_path, converge_tol=0.01, resume=True, **kw)
    assert again.steps == res.steps and again.stopped == "converged"
    full = fit(m, exs, converge_tol=None, **{**kw, "epochs": 3})
    assert full.stopped == "done" and full.steps == 3 * n_batches


def test_vector_vs_teacher_figures(planted, tmp_path):
    """Bug caught: the teacher's norm taken without its coeff, the fitted norm of another
    hook, or the cosine per step not logged: figures must match the vectors saved."""
    import json

    m, v, exs = planted
    t = {**steered(v), "coeff": 2.0}
    res = fit(m, exs, objective="sft", teacher=t, out_dir=tmp_path, max_steps=2, **QUICK)
    got = json.loads((tmp_path / "result.json").read_text())["vector_vs_teacher"][HOOK]
    fitted = res.vectors[HOOK]
    cos = float(torch.nn.functional.cosine_similarity(fitted, v, dim=0))
    assert got["cosine"] == pytest.approx(cos, abs=1e-5)
    assert got["fitted_norm"] == pytest.approx(float(fitted.norm()), rel=1e-5)
    assert got["teacher_norm"] == pytest.approx(2.0 * float(v.norm()), rel=1e-5)
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert json.loads(lines[-1])["teacher_cosine"] == pytest.approx(cos, abs=1e-5)


def test_evaluate_vectors_gives_the_online_fits_figures(planted):
    """Bug caught: evaluate_vectors scoring the fitted vectors with another KL than the
    base's (top-k or none, while the base's is the online KL): its kl_gap_closed must be
    the fit's own, on the same held-out rows."""
    from steerdiff.fit import evaluate_vectors

    m, v, exs = planted
    cfg = FitConfig(objective="online", max_steps=6, **QUICK)
    res = fit(m, exs, cfg, teacher=steered(v))
    again = evaluate_vectors(m, exs, res.vectors, cfg, teacher=steered(v))
    assert again["kl_gap_closed"] == pytest.approx(res.extra["kl_gap_closed"], abs=1e-4)
    assert again["val_kl"] == pytest.approx(res.extra["val_kl"], rel=1e-4)
    assert 0.2 < res.extra["kl_gap_closed"] < 0.999  # part of the gap: a real comparison


def test_online_kl_under_a_decoding_constraint(planted):
    """Bug caught (found at merge): under a constraint both distributions are -inf outside
    the allowed ids, and the KL written out as p * (log p - log q) gave 0 * (-inf + inf) =
    NaN there; also a constraint applied to one side only. The loss must equal the KL of
    the two distributions renormalised over each step's allowed ids, and its gradient must
    be finite."""
    m, v, exs = planted
    rows = [Example(ex.prompt_ids, ex.completion_ids) for ex in exs[:3]]
    for ex in rows:  # each step allows its own token and a few others
        ex.allowed = [sorted({t, 5, 6, 7 + i}) for i, t in enumerate(ex.completion_ids)]
    u = random_vector(m, HOOK, 5.0, seed=9).requires_grad_(True)
    teacher = OnlineTeacher(build_teacher(steered(v), m), 0)
    batch = collate(rows, 0)
    with steer(m, {HOOK: u}):
        hidden = full_hidden(m, batch.input_ids, batch.attention_mask)
    _, kl = online_losses(m, hidden, batch, teacher.target(rows, torch.device("cpu")))
    kl.sum().backward()
    assert bool(torch.isfinite(u.grad).all()) and float(u.grad.norm()) > 0
    with torch.no_grad():
        for r, ex in enumerate(rows):
            ids = torch.tensor([ex.prompt_ids + ex.completion_ids])
            with steer(m, {HOOK: v}):
                lp = m(input_ids=ids).logits[0].float().log_softmax(-1)
            with steer(m, {HOOK: u.detach()}):
                lq = m(input_ids=ids).logits[0].float().log_softmax(-1)
            want = 0.0
            for t, allowed in enumerate(ex.allowed):
                pos = len(ex.prompt_ids) - 1 + t
                p, q = lp[pos, allowed].log_softmax(-1), lq[pos, allowed].log_softmax(-1)
                want += float((p.exp() * (p - q)).sum())
            assert float(kl[r]) == pytest.approx(want, rel=1e-4, abs=1e-6)
