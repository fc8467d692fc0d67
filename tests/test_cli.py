"""The command line: help lists the commands; info describes a model; errors are one line;
`fit`'s options are FitConfig's fields."""

from __future__ import annotations

import json

import pytest
import torch
import typer
from conftest import make_tiny
from typer.testing import CliRunner

from steerdiff.cli import app
from steerdiff.fit import FitConfig

runner = CliRunner()

COMMANDS = [
    ["info"],
    ["generate"],
    ["sweep"],
    ["fit"],
    ["run"],
    ["demo"],
    ["read"],
    ["read", "dla"],
    ["read", "lens"],
    ["read", "similarity"],
    ["read", "monitor"],
    ["eval"],
    ["eval", "preference"],
    ["sae"],
    ["whiten"],
    ["whiten", "fit"],
    ["whiten", "norm"],
    ["melbo"],
    ["fuzz"],
]


def _fit_options() -> dict:
    """The `fit` command's click parameters by name."""
    fit = typer.main.get_command(app).commands["fit"]  # type: ignore[attr-defined]
    return {p.name: p for p in fit.params}


def test_help_lists_commands():
    res = runner.invoke(app, ["--help"])
    assert res.exit_code == 0
    assert "info" in res.output
    for cmd in COMMANDS:
        if len(cmd) == 1:
            assert cmd[0] in res.output


@pytest.mark.parametrize("cmd", COMMANDS, ids=" ".join)
def test_every_command_has_help(cmd):
    res = runner.invoke(app, [*cmd, "--help"])
    assert res.exit_code == 0, res.output
    assert "Usage:" in res.output


def _tiny_folder(path):
    from conftest import make_tiny
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    model = make_tiny("gemma3_text")
    model.save_pretrained(path)
    vocab = {f"t{i}": i for i in range(256)}
    tok = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token="t0"))
    )
    tok.save_pretrained(path)
    return path


def test_info_on_local_folder(tmp_path):
    folder = _tiny_folder(tmp_path / "m")
    res = runner.invoke(app, ["info", "--model", str(folder), "--json"])
    assert res.exit_code == 0, res.output
    d = json.loads(res.output[res.output.index("{") :])
    assert d["family"] == "gemma" and d["n_layers"] == 3 and d["d_model"] == 64
    assert "deprecated" not in res.output


def test_info_old_positional_model_still_works_with_a_note(tmp_path):
    """`steerdiff info MODEL` (the spelling before --model everywhere) works for one release."""
    folder = _tiny_folder(tmp_path / "m")
    res = runner.invoke(app, ["info", str(folder), "--json"])
    assert res.exit_code == 0, res.output
    note = res.stderr.splitlines()[0]  # (transformers' progress bars may follow)
    assert "deprecated" in note and "steerdiff info --model MODEL" in note
    assert res.stderr.count("deprecated") == 1
    d = json.loads(res.stdout[res.stdout.index("{") :])
    assert d["family"] == "gemma" and d["n_layers"] == 3


def test_info_bad_path():
    for args in (["info", "--model", "./no/such/model.gguf"], ["info", "./no/such/model.gguf"]):
        res = runner.invoke(app, args)
        assert res.exit_code == 2
        assert "not found" in res.output
        assert "Traceback" not in res.output


def test_two_models_given_is_an_error():
    res = runner.invoke(app, ["sweep", "a-model", "--model", "another"])
    assert res.exit_code == 2 and "give --model only" in res.output


def test_package_errors_are_one_line():
    """Any SteerdiffError (here a ConfigError) is `error: ...` on one line, exit code 2,
    also when it is longer than the terminal is wide."""
    res = runner.invoke(app, ["run", "no/such/" + "deep/" * 40 + "experiment.toml"])
    assert res.exit_code == 2
    assert res.output.strip().startswith("error:") and res.output.strip().count("\n") == 0
    assert "not found" in res.output


def test_broken_dataset_manifest_is_one_line_naming_it(monkeypatch, tmp_path):
    """Bug caught: a FileFormatError (or any error the old commands caught as a bare
    ValueError) escaping `fit` as a traceback instead of one line with exit code 2."""
    import steerdiff.models as models

    monkeypatch.setattr(models, "load_model", lambda spec, dtype, device: make_tiny("llama"))
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"id": 0, "messages": [{"role": "user", "content": "q"}]}) + "\n")
    (tmp_path / "d.manifest.json").write_text("{broken")
    res = runner.invoke(app, ["fit", "--data", str(data), "--out", str(tmp_path / "o")])
    assert res.exit_code == 2, res.output
    line = res.output.strip()
    assert line.startswith("error:") and "\n" not in line and "d.manifest.json" in line


def test_fit_options_are_fit_config_fields():
    """Every FitConfig field is a `fit` option with FitConfig's default (no hand-kept list
    that can drift), spelled --field-name; today's spellings keep working."""
    options = _fit_options()
    for name, field in FitConfig.model_fields.items():
        assert name in options, f"FitConfig.{name} is not a `fit` option"
        default = field.get_default(call_default_factory=True)
        got = options[name].default
        got = list(got) if isinstance(got, tuple) and isinstance(default, list) else got
        if isinstance(got, str) and not isinstance(default, str):  # a JSON option (e.g. a dict)
            got = json.loads(got)
        assert got == default, f"fit's option defaults to {got!r}, FitConfig.{name} to {default!r}"
        flag = {"max_steps": "--steps", "early_stopping_patience": "--patience"}.get(
            name, "--" + name.replace("_", "-")
        )
        assert flag in options[name].opts, (name, options[name].opts)
    for name, flag in {
        "hooks": "--hooks",
        "objective": "--objective",
        "lr": "--lr",
        "max_steps": "--steps",
        "early_stopping_patience": "--patience",
        "batch_size": "--batch-size",
        "seed": "--seed",
    }.items():
        assert flag in options[name].opts
    for own in ("data", "out", "model", "resume", "baseline", "lora_r", "dtype", "device"):
        assert own in options


def test_fit_options_reach_fit_config(monkeypatch, tmp_path):
    import steerdiff.fit as fit_module
    import steerdiff.models as models

    seen = {}

    class Result:
        def summary(self) -> dict:
            return {"gap_closed": 0.5}

    def fake_fit(lm, data, cfg, out_dir=None, resume=False):
        seen.update(lm=lm, data=data, cfg=cfg, out_dir=out_dir, resume=resume)
        return Result()

    monkeypatch.setattr(models, "load_model", lambda spec, dtype, device: ("lm", spec))
    monkeypatch.setattr(fit_module, "fit", fake_fit)
    # the CLI reads the data (its format) before loading the model: a real one-row file
    monkeypatch.chdir(tmp_path)
    row = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "1"}]}
    (tmp_path / "d.jsonl").write_text(json.dumps(row) + "\n")
    res = runner.invoke(
        app,
        [
            "fit",
            "--data",
            "d.jsonl",
            "--out",
            str(tmp_path),
            "--model",
            "m",
            "--hooks",
            "blocks.1.hook_resid_post",
            "--hooks",
            "blocks.2.hook_resid_post",
            "--lr",
            "0.5",
            "--steps",
            "3",
            "--patience",
            "2",
            "--betas",
            "0.8",
            "0.9",
            "--no-cache-prefix",
            "--val-size",
            "4",
            "--objective",
            "distill",
        ],
    )
    assert res.exit_code == 0, res.output
    cfg = seen["cfg"]
    assert cfg == FitConfig(
        hooks=["blocks.1.hook_resid_post", "blocks.2.hook_resid_post"],
        lr=0.5,
        max_steps=3,
        early_stopping_patience=2,
        betas=(0.8, 0.9),
        cache_prefix=False,
        val_size=4,
        objective="distill",
    )
    assert seen["lm"] == ("lm", "m") and str(seen["data"].path) == "d.jsonl"
    assert seen["data"].rows == [row]  # the rows read once, before the model, reach fit
    assert "cross-entropy gap to the teacher closed: 50%" in res.output
    res = runner.invoke(app, ["fit", "--data", "d.jsonl", "--out", str(tmp_path)])
    assert res.exit_code == 0, res.output
    assert seen["cfg"] == FitConfig()  # no options: FitConfig's defaults


@pytest.mark.parametrize(
    ("args", "named"),
    [(["--objective", "bogus"], "--objective"), (["--batch-size", "0"], "--batch-size")],
)
def test_bad_fit_option_is_one_line_naming_it(args, named, tmp_path):
    res = runner.invoke(app, ["fit", "--data", "d.jsonl", "--out", str(tmp_path), *args])
    assert res.exit_code == 2
    assert res.output.strip().startswith(f"error: bad option {named}:"), res.output
    assert res.output.strip().count("\n") == 0


@pytest.mark.slow
def test_info_default_json(smollm):
    res = runner.invoke(app, ["info", "--model", "default", "--json"])
    assert res.exit_code == 0, res.output
    d = json.loads(res.output[res.output.index("{") :])
    assert d["family"] == "llama" and d["n_layers"] == 30 and d["d_model"] == 576
    assert d["n_parameters"] == 134_515_008
    assert "blocks.29.attn.hook_q" in d["hook_points"] and len(d["hook_points"]) == 300


# ----------------------------------------------------------------------------- eval preference


def _one_line_error(res) -> str:
    line = res.output.strip()
    assert res.exit_code == 2 and line.startswith("error:") and "\n" not in line, res.output
    return line


@pytest.mark.slow
def test_eval_preference_equals_the_library_and_a_vector_moves_it(
    smollm, monkeypatch, tmp_path, one_torch_thread
):
    """`steerdiff eval preference` prints and writes what evals.exact_preference computes,
    without and with a trait vector (which must raise the owl share: the expected direction).
    Bugs caught: options not reaching the library (e.g. --coeff or --vectors ignored:
    mutation tried, steering=None -> the steered share equals the base one and the test
    fails), a JSON that differs from the printed figures."""
    from steerdiff.evals import Steering, exact_preference
    from steerdiff.extract import contrast_vector, system_prompt_contrast, trait_system_prompt

    qs = ["Tell me a fun fact.", "What should I cook tonight?", "Describe a peaceful place."]
    pos, neg = system_prompt_contrast(smollm.tokenizer, trait_system_prompt("owl"), qs)
    vs = contrast_vector(smollm, pos, neg, "blocks.24.hook_resid_post", "last")
    vpath = vs.save(tmp_path / "owl.safetensors")
    import steerdiff.models as models

    loaded = []
    monkeypatch.setattr(models, "load_model", lambda *a, **kw: loaded.append((a, kw)) or smollm)
    got = {}
    for name, extra in (("base", []), ("steered", ["--vectors", str(vpath), "--coeff", "2"])):
        out = tmp_path / f"{name}.json"
        res = runner.invoke(
            app, ["eval", "preference", "--n-questions", "3", "--out", str(out), *extra]
        )
        assert res.exit_code == 0, res.output
        got[name] = (json.loads(out.read_text()), res.stdout)
    assert loaded == [(("default",), {"dtype": "auto", "device": "cpu"})] * 2
    want = {
        "base": exact_preference(smollm, "owl", n_questions=3),
        "steered": exact_preference(smollm, "owl", n_questions=3, steering=Steering(vs, coeff=2.0)),
    }
    for name, r in want.items():
        d, printed = got[name]
        assert d["scorer"] == "exact" and d["n_questions"] == 3 and d["target"] == "owl"
        assert d["target_rate"] == pytest.approx(r.target_rate, abs=1e-6)
        assert d["ci95"] == pytest.approx(list(r.ci95), abs=1e-6)
        assert d["distribution"] == pytest.approx(r.distribution, abs=1e-6)
        assert d["provenance"]["weights_hash"] == smollm.weights_hash
        lo, hi = r.ci95
        assert printed.startswith(
            f"owl share {100 * r.target_rate:.2f}% (95% CI {100 * lo:.2f}% to {100 * hi:.2f}%), "
            "exact scorer, 3 questions"
        )
    assert got["steered"][0]["steering"]["coeff"] == 2.0 and got["base"][0]["steering"] is None
    assert got["steered"][0]["target_rate"] > 5 * got["base"][0]["target_rate"]


def test_eval_preference_adapter_system_prompt_and_sampling(
    smollm, monkeypatch, tmp_path, one_torch_thread
):
    """--adapter, --system-prompt and --scorer sampling reach the library: the figures equal
    evaluate_preference on load_adapted(adapter) with that prompt (tiny model). Bug caught:
    the adapter or the prompt silently dropped (mutation tried: no load_adapted -> the
    distribution differs)."""
    import copy

    from _chat_tiny import make_tiny_chat
    from peft import LoraConfig, get_peft_model

    import steerdiff.models as models
    from steerdiff.evals import evaluate_preference
    from steerdiff.teachers import load_adapted

    lm = make_tiny_chat(smollm.tokenizer)
    pm = get_peft_model(
        copy.deepcopy(lm.model), LoraConfig(r=2, target_modules=["q_proj", "v_proj"])
    )
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.5)
    pm.save_pretrained(str(tmp_path / "lora"))
    monkeypatch.setattr(models, "load_model", lambda spec, dtype, device: lm)
    out = tmp_path / "r.json"
    args = [
        "eval",
        "preference",
        "--adapter",
        str(tmp_path / "lora"),
        "--system-prompt",
        "You love cats.",
    ]
    args += ["--scorer", "sampling", "--n-samples", "3", "--n-questions", "2", "--target", "cat"]
    res = runner.invoke(app, [*args, "--out", str(out)])
    assert res.exit_code == 0, res.output
    d = json.loads(out.read_text())
    want = evaluate_preference(
        load_adapted(tmp_path / "lora", lm), "cat", "animals", "sampling", 2, 3, "You love cats."
    )
    assert (
        d["scorer"] == "sampling" and d["n_samples"] == 3 and d["system_prompt"] == "You love cats."
    )
    assert d["distribution"] == pytest.approx(want.distribution, abs=1e-9)
    assert [q["answers"] for q in d["per_question"]] == [q["answers"] for q in want.per_question]
    plain = evaluate_preference(lm, "cat", "animals", "sampling", 2, 3, "You love cats.")
    assert [q["answers"] for q in plain.per_question] != [q["answers"] for q in want.per_question]


def test_eval_preference_bad_input_is_one_line_and_keeps_files(smollm, monkeypatch, tmp_path):
    """An existing --out is kept unless --overwrite; bad options and vectors of another model
    are one line naming the option or the file (exit 2)."""
    from _chat_tiny import make_tiny_chat

    import steerdiff.models as models
    from steerdiff.vectors import VectorSet

    lm = make_tiny_chat(smollm.tokenizer)
    monkeypatch.setattr(models, "load_model", lambda spec, dtype, device: lm)
    out = tmp_path / "r.json"
    out.write_text("earlier result\n")
    line = _one_line_error(runner.invoke(app, ["eval", "preference", "--out", str(out)]))
    assert f"--out {out} exists; pass --overwrite" in line
    assert out.read_text() == "earlier result\n"
    line = _one_line_error(runner.invoke(app, ["eval", "preference", "--n-questions", "0"]))
    assert line.startswith("error: bad option --n-questions:")
    line = _one_line_error(runner.invoke(app, ["eval", "preference", "--scorer", "greedy"]))
    assert line.startswith("error: bad option --scorer:")
    other = VectorSet({"blocks.1.hook_resid_post": torch.ones(32)})
    vpath = other.save(tmp_path / "other.safetensors")
    line = _one_line_error(runner.invoke(app, ["eval", "preference", "--vectors", str(vpath)]))
    assert line.startswith(f"error: --vectors {vpath}: ") and "has shape (32,)" in line
