"""dtype="auto": what it picks from the hardware, where it is accepted, what provenance
records, and what stays float32 on a bfloat16 model (trainable vectors, their gradients
and optimiser state, LoRA and full-finetune weights)."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from _read_helpers import one_line_error, tiny_model_folder
from conftest import make_tiny
from test_train import HOOK, QUICK, steered_data, teacher  # noqa: F401  (fixture)
from typer.testing import CliRunner

import steerdiff.models as models
from steerdiff.cli import app
from steerdiff.dtypes import cpu_flags, pick_dtype
from steerdiff.fit import FitConfig, FitError, LoraConfig, fit, fit_full, fit_lora
from steerdiff.hooks import record, steer
from steerdiff.models import ModelLoadError, load_model
from steerdiff.pipeline import ConfigError, load_config, parse_config

pytestmark = pytest.mark.usefixtures("one_torch_thread")
BF16, F32 = torch.bfloat16, torch.float32
runner = CliRunner()


# ----------------------------------------------------------------------------- the decision


NO_AMX = "float32: CPU has avx512_bf16 but no AMX (bfloat16 measured 0.64x float32's speed there)"


@pytest.mark.parametrize(
    "device, flags, cuda_bf16, want, reason",
    [
        ("cpu", {"amx_bf16", "amx_tile"}, True, BF16, "bfloat16: CPU has amx_bf16"),
        ("cpu", {"amx_bf16", "avx512_bf16"}, True, BF16, "bfloat16: CPU has amx_bf16"),
        ("cpu", {"avx512f", "avx512_bf16"}, True, F32, NO_AMX),  # this project's machines
        ("cpu", {"avx512f", "avx2", "fma"}, True, F32, "float32: CPU has no AMX"),
        ("cpu", set(), True, F32, "float32: CPU has no AMX"),
        ("cuda", set(), True, BF16, "bfloat16: CUDA GPU with bfloat16"),
        ("cuda", set(), False, F32, "float32: this CUDA GPU does not compute bfloat16 natively"),
        ("mps", {"amx_bf16"}, True, F32, "float32: no bfloat16 rule for device 'mps'"),
    ],
)
def test_auto_picks_what_the_hardware_flags_say(device, flags, cuda_bf16, want, reason):
    """Catches: bfloat16 chosen on a CPU where it is slower than float32 (no AMX: AVX-512
    BF16 alone measured 0.64x, and a test of `avx512f` would pick it on every AVX-512
    CPU), an AMX CPU left in float32, CUDA not given bfloat16, and a reason that does not
    name the flag that decided."""
    assert pick_dtype(device, flags, cuda_bf16=cuda_bf16) == (want, reason)


def test_cpu_flags_come_from_the_flags_line_and_a_missing_file_means_none(tmp_path):
    """Catches: flags read from another line (`vmx flags`, `model name`), or an error on a
    machine without /proc/cpuinfo (macOS) instead of no flags (-> float32)."""
    info = tmp_path / "cpuinfo"
    info.write_text(
        "processor\t: 0\nmodel name\t: Intel(R) Xeon(R) amx_bf16\nvmx flags\t: ept amx_bf16\n"
        "flags\t\t: fpu sse avx512f avx512_bf16\n"
    )
    assert cpu_flags(info) == {"fpu", "sse", "avx512f", "avx512_bf16"}
    assert cpu_flags(tmp_path / "missing") == set()
    assert pick_dtype("cpu", cpu_flags(tmp_path / "missing"))[0] == F32


# ----------------------------------------------------------------------------- where accepted


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return tiny_model_folder(tmp_path_factory.mktemp("m") / "tiny")


def test_load_model_default_is_auto_and_provenance_says_why(folder, monkeypatch):
    """Catches: load_model's default left at float32 (auto never used), the CPU flags not
    consulted, an explicit float32 overridden by auto, and provenance not recording what
    was asked for and why the model has its dtype."""
    monkeypatch.setattr(models, "cpu_flags", lambda: {"avx512f", "amx_bf16"})
    lm = load_model(folder)
    assert lm.model.dtype == BF16
    prov = lm.provenance()
    assert (prov["dtype"], prov["dtype_requested"], prov["dtype_reason"]) == (
        "bfloat16",
        "auto",
        "bfloat16: CPU has amx_bf16",
    )
    f32 = load_model(folder, dtype="float32")
    assert f32.model.dtype == F32
    assert f32.provenance()["dtype_requested"] == "float32"
    assert f32.weights_hash == lm.weights_hash  # the files' hash, whatever the dtype
    monkeypatch.setattr(models, "cpu_flags", lambda: {"avx512f", "avx512_bf16"})
    plain = load_model(folder, dtype="auto")
    assert plain.model.dtype == F32
    assert plain.provenance()["dtype_reason"] == NO_AMX


def test_unknown_dtype_is_one_line_naming_auto(folder, tmp_path):
    """Catches: an unknown dtype loading a model anyway (or a traceback) instead of one
    line that names the value and the accepted names, auto among them."""
    with pytest.raises(ModelLoadError, match=r"Unknown dtype 'bogus'; use one of auto, "):
        load_model(folder, dtype="bogus")
    res = runner.invoke(app, ["info", "--model", str(folder), "--dtype", "bogus"])
    line = one_line_error(res)
    assert "'bogus'" in line and "auto" in line and "float32" in line


def test_cli_info_says_which_dtype_and_why(folder, monkeypatch):
    """Catches: `steerdiff info` (and so every command) not defaulting to auto, or not
    saying which dtype it picked and why."""
    monkeypatch.setattr(models, "cpu_flags", lambda: {"amx_bf16"})
    res = runner.invoke(app, ["info", "--model", str(folder), "--json"])
    assert res.exit_code == 0, res.output
    d = json.loads(res.stdout[res.stdout.index("{") :])
    assert d["dtype"] == "bfloat16"
    assert d["dtype_reason"] == "bfloat16: CPU has amx_bf16 (--dtype auto)"
    res = runner.invoke(app, ["info", "--model", str(folder), "--json", "--dtype", "float32"])
    d = json.loads(res.stdout[res.stdout.index("{") :])
    assert (d["dtype"], d["dtype_reason"]) == ("float32", "float32: requested (--dtype float32)")


def test_experiment_files_default_to_auto_and_refuse_a_bogus_dtype(tmp_path):
    """Catches: the experiment schema still defaulting to float32 or refusing "auto", a
    bogus dtype accepted, and `run --dtype` not overriding the file (or not validated)."""
    assert parse_config({"name": "x"}).dtype == "auto"
    assert parse_config({"name": "x", "dtype": "float32"}).dtype == "float32"
    with pytest.raises(ConfigError) as e:
        parse_config({"name": "x", "dtype": "bogus"}, source="x.toml")
    msg = str(e.value)
    assert msg.startswith("x.toml is not a valid experiment: dtype: ") and "'auto'" in msg
    assert "\n" not in msg
    exp = tmp_path / "e.toml"
    exp.write_text('name = "x"\ndtype = "bfloat16"\n')
    assert load_config(exp).dtype == "bfloat16"
    assert load_config(exp, dtype="float32").dtype == "float32"
    with pytest.raises(ConfigError, match=r"with --dtype fp8 is not a valid experiment: dtype"):
        load_config(exp, dtype="fp8")


def test_run_and_demo_dtype_option_is_checked_before_anything_runs(tmp_path):
    """Catches: `steerdiff run/demo --dtype` ignored (the file's dtype used: here the run
    would go on to load the model and fail on it instead) or not validated (a bogus
    dtype reaching the stages)."""
    exp = tmp_path / "e.toml"
    exp.write_text('name = "x"\nmodel = "./no/such/model"\n')
    runs = tmp_path / "runs"
    for cmd in (["run", str(exp)], ["demo"]):
        res = runner.invoke(app, [*cmd, "--dtype", "bogus", "--runs-dir", str(runs)])
        line = one_line_error(res)
        assert "with --dtype bogus is not a valid experiment: dtype: Input should be" in line
    assert not runs.exists()


# ----------------------------------------------------------------------------- float32 stays


def test_float32_vector_steers_a_bfloat16_model_in_bfloat16_and_gets_float32_gradients():
    """Catches: the vector converted in place to the model's dtype (a trained float32
    vector silently becomes bfloat16 and loses its small updates), the addition done in
    float32 (the residual stream leaves bfloat16), and the cast cutting the gradient
    (the float32 vector then never trains through a bfloat16 model)."""
    model = make_tiny("llama").to(BF16)
    ids = torch.randint(3, 200, (2, 5), generator=torch.Generator().manual_seed(0))
    v = (0.5 * torch.randn(64, generator=torch.Generator().manual_seed(1))).requires_grad_(True)
    before = v.detach().clone()
    with torch.no_grad(), record(model, HOOK) as rec:
        model(input_ids=ids)
    base = rec[HOOK]
    with record(model, HOOK) as rec, steer(model, {HOOK: v}, coeff=2.0):
        logits = model(input_ids=ids).logits
    assert rec[HOOK].dtype == BF16 and logits.dtype == BF16
    # the addition happens in bfloat16: exactly base + (2 v rounded to bfloat16)
    torch.testing.assert_close(rec[HOOK], base + 2.0 * v.detach().to(BF16), rtol=0, atol=0)
    assert v.dtype == F32 and torch.equal(v.detach(), before)  # not converted in place
    logits.float().logsumexp(-1).sum().backward()
    assert v.grad is not None and v.grad.dtype == F32
    assert torch.isfinite(v.grad).all() and v.grad.norm() > 1e-3


def test_a_fit_on_a_bfloat16_model_trains_float32_vectors_with_float32_adam_state(
    steered_data,  # noqa: F811
    tmp_path,
):
    """Catches: trainable vectors made in the model's dtype (init_vectors following the
    model), which makes the optimiser state bfloat16 too and loses updates smaller than a
    bfloat16 step; and the checkpoint not recording the model's dtype, so a float32 fit
    would silently resume in bfloat16 (the new default)."""
    m, v, exs = steered_data
    m16 = copy.deepcopy(m).to(BF16)
    cfg = FitConfig(hooks=[HOOK], objective="distill", checkpoint_every=1, **QUICK)
    res = fit(m16, exs, cfg, teacher=teacher(v), out_dir=tmp_path / "a")
    assert res.vectors[HOOK].dtype == F32 and res.vectors[HOOK].norm() > 0.1
    ck = torch.load(tmp_path / "a" / "checkpoint.pt", weights_only=False)
    assert ck["params"][HOOK].dtype == F32
    states = ck["optimizer"]["state"].values()
    assert {s["exp_avg"].dtype for s in states} == {F32}
    assert {s["exp_avg_sq"].dtype for s in states} == {F32}
    assert ck["identity"]["dtype"] == "bfloat16"
    with pytest.raises(FitError, match=r'dtype: "bfloat16" -> "float32"'):
        fit(m, exs, cfg, teacher=teacher(v), out_dir=tmp_path / "a", resume=True)


def _trainable_after_one_step(fit_fn, m16, exs, v, tmp_path, **kw):
    """The trainable tensors (name -> copy) right after setup and after one step."""
    seen: dict[str, dict[str, torch.Tensor]] = {}
    import steerdiff.fit.baselines as baselines

    real = baselines.ModuleStudent.__init__

    def spy(self, module, params):
        real(self, module, params)
        seen["params"] = params
        seen["start"] = {k: p.detach().clone() for k, p in params.items()}

    cfg = FitConfig(objective="sft", optimizer="adamw", **{**QUICK, "lr": 1e-3, "max_steps": 1})
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(baselines.ModuleStudent, "__init__", spy)
        res = fit_fn(m16, exs, cfg, teacher=teacher(v), out_dir=tmp_path, **kw)
    return res, seen


def test_lora_on_a_bfloat16_model_trains_float32_adapter_weights(steered_data, tmp_path):  # noqa: F811
    """Catches: LoRA adapter weights created in the model's bfloat16 (peft's
    autocast_adapter_dtype off): an AdamW step of lr 1e-3 then rounds away on most
    weights, and the saved adapter is bfloat16."""
    m, v, exs = steered_data
    m16 = copy.deepcopy(m).to(BF16)
    res, seen = _trainable_after_one_step(fit_lora, m16, exs, v, tmp_path, lora=LoraConfig(r=2))
    assert {t.dtype for t in seen["start"].values()} == {F32}
    assert len(seen["params"]) == 2 * 7 * 3  # A and B of 7 projections x 3 layers
    # lora_B starts at zero: one AdamW step of lr 1e-3 moves every one of its weights
    b = [k for k in seen["params"] if "lora_B" in k]
    moved = [float((seen["params"][k].detach() != seen["start"][k]).float().mean()) for k in b]
    assert min(moved) > 0.99, moved
    assert {t.dtype for t in res.state.values()} == {F32}
    assert json.loads((tmp_path / "lora.json").read_text())["train_dtype"] == "float32"
    assert m16.dtype == BF16 and not any("lora" in n for n, _ in m16.named_modules())


def test_full_finetune_of_a_bfloat16_model_trains_in_float32(steered_data, tmp_path):  # noqa: F811
    """Catches: a full finetune that trains the bfloat16 weights themselves (an update
    below 1/256 of a weight is lost: with lr 1e-3 most weights would not move), and a
    finetuned copy left in float32 beside a bfloat16 base (evaluations would then compare
    two precisions)."""
    m, v, exs = steered_data
    m16 = copy.deepcopy(m).to(BF16)
    res, seen = _trainable_after_one_step(fit_full, m16, exs, v, tmp_path)
    assert {t.dtype for t in seen["start"].values()} == {F32}
    start16 = {k: t.to(BF16) for k, t in seen["start"].items()}
    assert torch.equal(start16["model.embed_tokens.weight"], m16.model.embed_tokens.weight)
    from safetensors.torch import load_file

    saved = load_file(tmp_path / "model.safetensors")
    assert {t.dtype for t in saved.values()} == {F32}
    w = "model.layers.0.mlp.up_proj.weight"
    frac = float((saved[w] != seen["start"][w]).float().mean())
    assert frac > 0.99, frac  # AdamW's first step moves every weight by about lr (1e-3)
    assert res.model.dtype == BF16 and m16.dtype == BF16  # evaluated like the base
    prov = json.loads((tmp_path / "result.json").read_text())["provenance"]
    assert prov["train_dtype"] == "float32" and prov["dtype"] == "bfloat16"
