"""Memory budgets (steerdiff.budget) and the fit's prefix cache beyond its budget."""

from __future__ import annotations

import tempfile
from pathlib import Path

import pytest
import torch
from conftest import FAMILIES, make_tiny
from pydantic import ValidationError
from transformers import AutoConfig

from steerdiff.budget import (
    ENV_VAR,
    BudgetError,
    SpillCache,
    estimate_prefix_bytes,
    memory_budget_bytes,
    nbytes,
    parse_budget,
    physical_memory_bytes,
)
from steerdiff.fit import Example, FitConfig, collate, fit, split_examples
from steerdiff.fit import memory as fit_memory
from steerdiff.fit.loop import cache_use, fixed_batches
from steerdiff.fit.memory import CacheUse, pack_topk, plan_prefix_cache
from steerdiff.replay import Prefix, compute_prefix, prefix_hidden

pytestmark = pytest.mark.usefixtures("one_torch_thread")
HOOK = "blocks.1.hook_resid_post"


def test_budget_sizes_and_shares_of_ram_parse_to_bytes(monkeypatch):
    """Bugs: GB read as GiB (or the reverse), '%' of RAM read as bytes, a default that is
    not 25% of RAM, the environment variable ignored."""
    assert parse_budget("4GB") == 4_000_000_000
    assert parse_budget("1.5 GiB") == 3 * 2**29
    assert parse_budget("512mb") == 512_000_000
    assert parse_budget(0) == parse_budget("0") == 0
    with pytest.raises(BudgetError, match="cannot read -1 as a memory budget"):
        parse_budget(-1)
    assert parse_budget("25%") == int(0.25 * physical_memory_bytes())
    monkeypatch.delenv(ENV_VAR, raising=False)
    assert memory_budget_bytes() == int(0.25 * physical_memory_bytes())
    monkeypatch.setenv(ENV_VAR, "3GB")
    assert memory_budget_bytes() == 3_000_000_000
    assert memory_budget_bytes("1GB") == 1_000_000_000  # the option wins over the variable


@pytest.mark.parametrize("bad", ["lots", "4 parsecs", "-1GB", "150%", ""])
def test_a_bad_budget_is_one_line_naming_the_option_and_the_fix(bad, monkeypatch):
    """Bug: a bad budget read as 0 (everything spills, silently) or a traceback."""
    with pytest.raises(BudgetError) as e:
        parse_budget(bad, "cache_budget")
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(f"cache_budget: cannot read {bad!r}")
    assert "'4GB'" in msg and "'25%'" in msg
    with pytest.raises(ValidationError, match="cache_budget: cannot read"):
        FitConfig(cache_budget=bad)
    monkeypatch.setenv(ENV_VAR, bad or "x")
    with pytest.raises(BudgetError, match=f"^{ENV_VAR}: cannot read"):
        memory_budget_bytes()


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("start", [0, 2])
def test_prefix_estimate_is_the_bytes_of_the_real_prefix(family, start):
    """Bug: the estimate forgets the masks or the rotary cos/sin, counts a tensor every
    layer shares once per layer, or uses 4 bytes for a bfloat16 model."""
    model = make_tiny(family)
    ids = torch.randint(2, 200, (2, 7))
    mask = torch.ones(2, 7, dtype=torch.long)
    mask[1, 5:] = 0  # padding: a batch of the fit
    for dtype in (torch.float32, torch.bfloat16):
        model.to(dtype)
        p = compute_prefix(model, ids, mask, start)
        real = nbytes(p.state())
        assert estimate_prefix_bytes(model.config, 2, 7, dtype, start) == real
    # two batches of 2 rows: the per-row part doubles, the per-batch part too
    assert estimate_prefix_bytes(model.config, 4, 7, dtype, start, batch_size=2) == 2 * real


def test_a_spilled_prefix_replays_the_same_as_in_memory(tmp_path):
    """Bug: a spilled entry loses a call argument (mask, rotary), or comes back as another
    entry; the replay from disk must equal the one from RAM bit for bit."""
    model = make_tiny("gemma2")
    ids = torch.randint(2, 200, (3, 9))
    mask = torch.ones(3, 9, dtype=torch.long)
    mask[0, 6:] = 0
    with SpillCache(0, "test", tmp_path) as cache:  # budget 0: every entry goes to disk
        for key in range(2):
            p = compute_prefix(model, ids.roll(key, 1), mask, 1)
            cache.put(key, p.state())
            assert cache.bytes_on_disk == (key + 1) * nbytes(p.state())
        assert cache.bytes_in_memory == 0 and len(list(cache.folder.iterdir())) == 2
        for key in range(2):
            back = Prefix.from_state(cache.get(key))
            ref = compute_prefix(model, ids.roll(key, 1), mask, 1)
            assert torch.equal(prefix_hidden(model, back), prefix_hidden(model, ref))


def rows(n: int = 24, seed: int = 0) -> list[Example]:
    g = torch.Generator().manual_seed(seed)
    return [
        Example(
            torch.randint(2, 256, (5 + i % 3,), generator=g).tolist(),
            torch.randint(2, 256, (4 + i % 4,), generator=g).tolist(),
        )
        for i in range(n)
    ]


QUICK = dict(
    hooks=[HOOK], objective="sft", batch_size=8, micro_batch_size=4, epochs=3, lr=0.05,
    val_size=8, progress=False,
)  # fmt: skip


def test_a_prefix_cache_over_its_budget_spills_and_fits_the_same(tmp_path, monkeypatch, capsys):
    """Bug: the spilled cache gives other vectors or losses than the in-memory one (a wrong
    entry read back, a mask dropped), or the fit does not say what it chose."""
    model = make_tiny("llama")
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    mem = fit(model, rows(), FitConfig(**QUICK))
    spill = fit(model, rows(), FitConfig(**{**QUICK, "cache_budget": "0", "progress": True}))
    said = capsys.readouterr().err
    assert "> budget 0 B (cache_budget): spilling " in said
    assert f"to a memory-mapped temporary file in {tmp_path}/steerdiff-prefix-" in said
    for k in mem.vectors:
        assert torch.equal(mem.vectors[k], spill.vectors[k])
    assert [r["train_loss"] for r in mem.metrics] == [r["train_loss"] for r in spill.metrics]
    assert mem.fitted_val_loss == spill.fitted_val_loss
    assert list(tmp_path.iterdir()) == []  # the spill folder is gone after the fit


def test_spill_files_are_removed_after_a_fit_that_fails(tmp_path, monkeypatch):
    """Bug: an exception mid-fit leaves gigabytes of spilled activations in /tmp."""
    model = make_tiny("llama")
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    seen: list[Path] = []

    def boom(step: int, row: dict) -> None:
        seen.extend(tmp_path.glob("steerdiff-prefix-*/*.pt"))
        if step == 4:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        fit(model, rows(), FitConfig(**QUICK, cache_budget="0"), on_step=boom)
    assert seen  # it did spill ...
    assert list(tmp_path.iterdir()) == []  # ... and cleaned up


def test_the_fit_caches_only_what_it_reads_again(capsys):
    """Bugs: a one-epoch fit holds every batch's prefix although none is read twice (the
    demo's qkv fit); the plan's size is not the sum of the micro-batches' estimates."""
    model = make_tiny("llama")
    fit(model, rows(), FitConfig(**{**QUICK, "epochs": 1, "progress": True}))
    assert "prefix cache: none (no batch is read twice)" in capsys.readouterr().err
    cfg = FitConfig(**QUICK)
    train, val = split_examples(rows(), cfg)
    batches = fixed_batches(train, cfg)
    use = cache_use(batches, val, cfg, total=6, eval_every=2)
    assert use.train_reads == 3 and use.val_reads == 3
    shapes = [(len(c), max(map(len, c))) for r in batches for c in (r[:4], r[4:])]
    assert use.train_shapes == shapes and len(use.val_shapes) == 2
    plan = plan_prefix_cache(model.config, torch.float32, 1, use, cfg)
    want = sum(
        estimate_prefix_bytes(model.config, b, s, torch.float32, 1)
        for b, s in shapes + use.val_shapes
    )
    assert (plan.mode, plan.keep, plan.need) == ("memory", ("train", "val"), want)
    assert f"24 rows x up to {max(s for _, s in shapes + use.val_shapes)} tokens" in plan.message


def test_a_7b_fit_of_30000_rows_does_not_plan_to_hold_its_prefix_in_ram():
    """Bug: the plan of a fit far beyond RAM says 'in memory' (the issue's 7B x 30,000 rows)."""
    config = AutoConfig.for_model(
        "llama", hidden_size=4096, num_attention_heads=32, num_hidden_layers=32
    )
    use = CacheUse([(16, 96)] * (30_000 // 16), 2, [], 0)
    cfg = FitConfig(cache_budget="6GB")
    plan = plan_prefix_cache(config, torch.bfloat16, 20, use, cfg)
    per_batch = 16 * 96 * 4096 * 2 + 16 * 96 * 96 + 2 * 96 * 128 * 2 + 96 * 8
    assert plan.need == (30_000 // 16) * per_batch  # 23.9 GB, hidden states above all
    assert plan.mode in ("spill", "recompute") and "> budget 6.0 GB" in plan.message


MIXED = [
    "blocks.1.hook_resid_pre",
    "blocks.1-2.attn.hook_{q,k,v}",
    "blocks.2.ln2.hook_normalized",
    "blocks.2.hook_resid_post",
]


@pytest.mark.parametrize("family", FAMILIES)
def test_recomputed_blocks_give_the_same_fit_bit_for_bit(family, capsys, monkeypatch):
    """Bugs: a recomputed block is replayed without its vectors in the backward pass (the
    steering context has ended by then: wrong or missing gradients), a vector steered twice,
    or a spilled prefix that differs from the one in RAM, in any family."""
    model = make_tiny(family)
    cfg = {**QUICK, "hooks": MIXED, "epochs": 2, "progress": True}
    kept = fit(model, rows(16), FitConfig(**cfg, cache_budget="1GB"))
    monkeypatch.setattr(fit_memory, "activation_budget", lambda model: 0)
    redone = fit(model, rows(16), FitConfig(**cfg, cache_budget="0"))
    said = capsys.readouterr().err
    assert "x 2 blocks = " in said and ", kept" in said  # the first fit keeps them ...
    assert "recomputing 2 of 2 blocks in the backward pass" in said  # ... the second does not
    for k in kept.vectors:
        assert torch.equal(kept.vectors[k], redone.vectors[k]), k
    assert [r["train_loss"] for r in kept.metrics] == [r["train_loss"] for r in redone.metrics]


def test_sweep_recordings_over_their_budget_spill_and_replay_the_same(tmp_path, monkeypatch):
    """Bug: a recording spilled past the budget (every block's output of every prompt, the
    sweep's cache) comes back as another pass, or loses its outputs; and its file stays
    behind after close()."""
    from _read_helpers import ByteTok

    from steerdiff.evals import CachedPrompts
    from steerdiff.models import wrap_model

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    lm = wrap_model(make_tiny("qwen2"), ByteTok(), spec="tiny")
    prompts = [[1, 5, 6, 7, 8, 9], [1, 5, 6, 10, 11], [1, 5, 6, 12, 13, 14, 15, 16]]
    row_prompt, row_tokens = [0, 1, 2, 0], [[20, 21], [22], [23, 24, 25], [26]]
    ram = CachedPrompts(lm, prompts, row_prompt, row_tokens, budget=2**30)
    disk = CachedPrompts(lm, prompts, row_prompt, row_tokens, budget=0)
    assert ram.store.bytes_on_disk == 0 and disk.store.bytes_in_memory == 0
    assert disk.store.bytes_on_disk == ram.store.bytes_in_memory
    assert len(list(disk.store.folder.iterdir())) == 5  # first, second, lengths 1, 2, 3
    v = torch.randn(64, generator=torch.Generator().manual_seed(2))
    for layer in range(3):
        a, b = ram.replay(layer, v, 3.0), disk.replay(layer, v, 3.0)
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    disk.close()
    assert list(tmp_path.iterdir()) == []


def topk_rows(n: int = 16) -> list[Example]:
    g = torch.Generator().manual_seed(5)
    out = rows(n)
    for ex in out:
        m = len(ex.completion_ids)
        ex.topk_ids = torch.randint(0, 256, (m, 4), generator=g).tolist()
        ex.topk_logprobs = torch.randn(m, 4, generator=g).log_softmax(-1).double().tolist()
    return out


def test_top_k_log_probs_packed_or_mapped_collate_to_the_same_batches(tmp_path, monkeypatch):
    """Bugs: packing the teacher's top-k into arrays shifts a row's slice (another token's
    top-k), rounds the log-probs otherwise than collate did, or leaves its file behind."""
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    lists = topk_rows()
    want = collate(lists, 0)
    for budget, where in ((2**30, "in memory"), (0, "memory-mapped")):
        packed = topk_rows()
        said = pack_topk(packed, budget)
        n_tok = sum(len(ex.completion_ids) for ex in packed)
        assert said.startswith(f"top-k log-probs: {n_tok} tokens x 4 = ") and said.endswith(where)
        got = collate(packed, 0)
        assert torch.equal(got.topk_ids, want.topk_ids)
        assert torch.equal(got.topk_logprobs, want.topk_logprobs)
        assert list(tmp_path.iterdir()) == []  # the mapped file is unlinked at once
    assert pack_topk(packed, 0) is None  # already packed


def test_a_distillation_fit_with_every_cache_on_disk_fits_the_same(monkeypatch):
    """Bug: a fit whose top-k log-probs are memory-mapped, whose prefix cache is spilled and
    whose blocks are recomputed trains other vectors than one with all of them in RAM."""
    model = make_tiny("llama")
    cfg = {**QUICK, "objective": "distill"}
    ram = fit(model, topk_rows(), FitConfig(**cfg, cache_budget="1GB"))
    monkeypatch.setattr(fit_memory, "activation_budget", lambda model: 0)
    disk = fit(model, topk_rows(), FitConfig(**cfg, cache_budget="0"))
    for k in ram.vectors:
        assert torch.equal(ram.vectors[k], disk.vectors[k])
    assert [r["train_kl"] for r in ram.metrics] == [r["train_kl"] for r in disk.metrics]


def test_cli_fit_with_a_bad_budget_is_one_line_and_writes_nothing(tmp_path):
    """Bug: `steerdiff fit --cache-budget lots` starts the fit (and fails late, or spills
    everything) instead of one line naming the option and the forms it takes."""
    from typer.testing import CliRunner

    from steerdiff.cli import app

    data = tmp_path / "d.jsonl"
    data.write_text("{}\n")
    out = tmp_path / "out"
    args = ["fit", "--data", str(data), "--out", str(out), "--cache-budget", "lots"]
    r = CliRunner().invoke(app, args)
    lines = r.output.strip().splitlines()
    assert r.exit_code == 2 and len(lines) == 1, r.output
    assert lines[0].startswith("error: bad option --cache-budget: ")
    assert "cannot read 'lots' as a memory budget" in lines[0] and "'4GB'" in lines[0]
    assert not out.exists() and data.read_text() == "{}\n"
