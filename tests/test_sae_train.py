"""SAE training (steerdiff.fit.sae_train), its metrics, splicing, and `steerdiff sae train/eval`.

All on a tiny random llama with a byte tokenizer (tests/_read_helpers.byte_tokenizer)."""

from __future__ import annotations

import json

import pytest
import torch
from _read_helpers import byte_tokenizer, one_line_error, tiny_model_folder
from conftest import make_tiny
from typer.testing import CliRunner

from steerdiff.cli import app
from steerdiff.fit.sae_activations import hook_activations
from steerdiff.fit.sae_metrics import evaluate_sae
from steerdiff.fit.sae_topk import TopKTrainer, fold_scale
from steerdiff.fit.sae_train import SAETrainConfig, SAETrainError, train_saes
from steerdiff.interpret.corpus import load_corpus
from steerdiff.models import load_model, wrap_model
from steerdiff.sae import SAE, load_sae
from steerdiff.sae.splice import replace_activations, splice

pytestmark = pytest.mark.usefixtures("one_torch_thread")
runner = CliRunner()
HOOK = "blocks.1.hook_resid_post"


@pytest.fixture(scope="module")
def lm():
    return wrap_model(make_tiny("llama"), byte_tokenizer(), spec="tiny-llama-bytes")


@pytest.fixture(scope="module")
def texts():
    return load_corpus(n=60, seed=1).texts


def small_cfg(**kw) -> SAETrainConfig:
    base = dict(
        hooks=[HOOK], expansion=4, k=8, tokens=8 * 512, batch_tokens=512, buffer_tokens=2048,
        max_len=64, model_batch=4, eval_texts=10, eval_tokens=600, checkpoint_every=3,
    )  # fmt: skip
    return SAETrainConfig(**{**base, **kw})


def held_out_acts(lm, texts) -> torch.Tensor:
    ids = torch.tensor([lm.tokenizer(t[:200])["input_ids"][:48] for t in texts if len(t) > 200][:8])
    return hook_activations(lm, [HOOK], ids)[HOOK]


def fvu(sae: SAE, x: torch.Tensor) -> float:
    return float(((x - sae(x)) ** 2).sum() / ((x - x.mean(0)) ** 2).sum())


def test_training_lowers_reconstruction_error(lm, texts, tmp_path):
    """Bug: a step that does not update the weights (or updates them the wrong way), or a
    scale folded in wrongly at save: held-out FVU would not fall far below its initial value.
    (Mutation tried: `self.opt.step()` removed -> FVU 0.62 vs 0.60 at init, failed.)"""
    x = held_out_acts(lm, texts[-10:])
    saes = train_saes(lm, small_cfg(tokens=80 * 512), tmp_path / "run", texts[:-10], progress=False)
    cfg_json = json.loads((tmp_path / "run" / HOOK / "cfg.json").read_text())
    s = cfg_json["steerdiff"]["train"]["scale"]  # the run's start, same init and scale
    init = TopKTrainer(64, 256, 8, 1e-3, seed=0, b_dec=(x * s).mean(0)).to_sae(s, HOOK)
    before, after = fvu(init, x), fvu(saes[HOOK], x)
    assert after < 0.5 * before, (before, after)
    assert after < 0.4


def test_topk_keeps_exactly_k_and_decoder_rows_stay_unit_norm():
    """Bugs: topk applied to the wrong axis / relu after topk lost, or decoder rows not
    renormalised after the Adam step. (Mutation tried: the renormalisation line removed ->
    row norms up to 1.06, failed.)"""
    torch.manual_seed(0)
    x = torch.randn(256, 16) + 3  # every latent's pre-activation mostly positive -> L0 = k
    t = TopKTrainer(16, 64, 5, 1e-2, seed=1, b_dec=torch.zeros(16))
    for _ in range(5):
        stats = t.step(x)
    norms = t.W_dec.detach().norm(dim=1)
    assert torch.allclose(norms, torch.ones(64), atol=1e-5)
    sae = t.to_sae(1.0, HOOK)
    z = sae.encode(x)
    assert ((z != 0).sum(-1) <= 5).all() and stats["l0"] <= 5
    pre = sae.pre_acts(x)
    want = torch.relu(pre).topk(5, -1)  # the direct computation
    assert torch.equal(z.gather(-1, want.indices), want.values)


def test_normalisation_folding_is_exact():
    """Bug: a wrong fold (e.g. b_dec not divided by the scale, or W_enc divided): the saved SAE
    on raw x would not equal the trained one on scaled x, rescaled. (Mutation tried: b_dec
    left unscaled in fold_scale -> other latents fire, failed.)"""
    torch.manual_seed(0)
    trained = SAE(
        W_enc=torch.randn(8, 32), b_enc=torch.randn(32), W_dec=torch.randn(32, 8),
        b_dec=torch.randn(8), activation="topk", k=4, apply_b_dec_to_input=True, hook=HOOK,
    )  # fmt: skip
    s = 3.7
    x = torch.randn(50, 8) * 5
    folded = fold_scale(trained, s)
    assert torch.equal(folded.encode(x) > 0, trained.encode(x * s) > 0)
    torch.testing.assert_close(folded(x), trained(x * s) / s, atol=1e-5, rtol=1e-5)


def identity_sae(d: int, hook: str) -> SAE:
    """relu(x) - relu(-x) = x: W_enc = [I, -I], W_dec = [I; -I]."""
    eye = torch.eye(d)
    return SAE(
        W_enc=torch.cat([eye, -eye], 1), b_enc=torch.zeros(2 * d),
        W_dec=torch.cat([eye, -eye], 0), b_dec=torch.zeros(d), activation="relu", hook=hook,
    )  # fmt: skip


@pytest.mark.parametrize("hook", [HOOK, "blocks.1.hook_resid_mid", "blocks.2.hook_mlp_out"])
def test_splicing_an_identity_sae_leaves_the_loss_unchanged(lm, hook):
    """Bugs: the hook writes the reconstruction at the wrong place (resid_mid written into the
    MLP's input only), or splice does nothing at all. (Mutation tried: resid_mid's write as
    `_apply(fn, pre + out)` without `- pre` -> loss changed by 0.021, failed.)"""
    ids = torch.randint(0, 256, (2, 20))

    def loss() -> float:
        return float(lm.model(input_ids=ids, labels=ids).loss)

    clean = loss()
    with splice(lm, identity_sae(64, hook)):
        spliced = loss()
    with replace_activations(lm, {hook: torch.zeros_like}):
        zero = loss()
    assert abs(spliced - clean) < 1e-5
    assert abs(zero - clean) > 1e-3


def test_splice_hook_is_removed_after_an_exception(lm):
    """Bug: hooks removed only on a normal exit -> the model stays ablated after an error.
    (Mutation tried: the handles not removed in `finally` -> the loss after the error is
    the ablated one, 5.545 vs 5.567, failed.)"""
    ids = torch.randint(0, 256, (1, 12))
    clean = float(lm.model(input_ids=ids, labels=ids).loss)
    with pytest.raises(RuntimeError, match="boom"):
        with replace_activations(lm, {HOOK: torch.zeros_like}):
            raise RuntimeError("boom")
    assert float(lm.model(input_ids=ids, labels=ids).loss) == clean


def test_evaluate_identity_sae_recovers_all_the_loss(lm, texts):
    """Bug: ce_recovered's formula inverted, or EV computed against the wrong mean: an exact
    reconstruction must give EV 1, CE recovered 1. (Mutation tried: recovered =
    (spliced - zero) / (zero - clean) -> -1, failed.)"""
    m = evaluate_sae(lm, identity_sae(64, HOOK), texts[:6], max_len=32)
    assert abs(m["explained_variance"] - 1) < 1e-5
    assert abs(m["ce_recovered"] - 1) < 1e-4 and abs(m["ce_spliced"] - m["ce_clean"]) < 1e-5
    assert m["n_tokens"] == 6 * 31 and m["dead_fraction"] == 0.0


def test_interrupted_run_resumes_to_the_same_weights(lm, texts, tmp_path):
    """Bug: a resume that skips or repeats data, forgets Adam's state, the dead-latent counters
    or the scale: the final weights would differ from an uninterrupted run's. (Mutations
    tried: the optimizer state not restored -> weights not close, failed; the cursor's `used`
    ignored (batches repeated) -> weights not close, failed.)"""
    cfg = small_cfg(tokens=10 * 512, dead_tokens=512)  # AuxK active early
    whole = train_saes(lm, cfg, tmp_path / "a", texts, progress=False)

    def stop(step: int) -> None:
        if step == 7:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train_saes(lm, cfg, tmp_path / "b", texts, progress=False, on_step=stop)
    ck = torch.load(tmp_path / "b" / "checkpoint.pt", weights_only=False)
    assert ck["step"] == 6 and not (tmp_path / "b" / HOOK).exists()
    resumed = train_saes(lm, cfg, tmp_path / "b", texts, progress=False)
    for name in ("W_enc", "b_enc", "W_dec", "b_dec"):
        a, b = getattr(whole[HOOK], name), getattr(resumed[HOOK], name)
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0)
    m = json.loads((tmp_path / "b" / "metrics.json").read_text())
    assert m["tokens"] == 10 * 512 and m["steps"] == 10
    cfg_json = json.loads((tmp_path / "b" / HOOK / "cfg.json").read_text())
    assert cfg_json["steerdiff"]["weights_hash"] == lm.weights_hash
    assert cfg_json["steerdiff"]["settings"]["k"] == 8 and cfg_json["k"] == 8


def test_resume_with_other_settings_is_refused_in_one_line(lm, texts, tmp_path):
    """Bug: a run resumed with another k silently mixes two trainings. (Mutation tried: the
    settings comparison dropped from prepare_out -> training continued, failed.)"""
    cfg = small_cfg(tokens=2 * 512)
    train_saes(lm, cfg, tmp_path / "r", texts, progress=False)
    before = (tmp_path / "r" / HOOK / "sae_weights.safetensors").read_bytes()
    with pytest.raises(SAETrainError) as e:
        train_saes(lm, small_cfg(tokens=2 * 512, k=4), tmp_path / "r", texts, progress=False)
    msg = str(e.value)
    assert "\n" not in msg and "k 8 -> 4" in msg and "--overwrite" in msg and "--out" in msg
    assert (tmp_path / "r" / HOOK / "sae_weights.safetensors").read_bytes() == before


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--hooks", "blocks.9.hook_resid_post"], "unknown hook 'blocks.9.hook_resid_post'"),
        (["--hooks", HOOK, "--k", "0"], "--k 0 is out of range"),
        (["--hooks", HOOK, "--k", "1000", "--expansion", "2"], "give 1 <= k <= 128"),
        (["--hooks", HOOK, "--expansion", "0"], "--expansion 0 is out of range"),
        (["--hooks", HOOK, "--tokens", "100", "--batch-tokens", "512"], "--tokens 100 is fewer"),
        (["--hooks", HOOK, "--out", "NOTSAE"], "is not a steerdiff SAE training folder"),
    ],
)
def test_cli_bad_input_one_line_exit_2(tmp_path, args, needle):
    """Bug: a bad option reaching training (a traceback, or a folder of other files written
    into). (Mutation tried: the k range check removed -> training started, not one line, failed.)"""
    folder = tiny_model_folder(tmp_path / "m")
    other = tmp_path / "NOTSAE"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    if "--out" not in args:
        args = [*args, "--out", str(tmp_path / "run")]
    args = [a if a != "NOTSAE" else str(other) for a in args]
    res = runner.invoke(app, ["sae", "train", "--model", str(folder), *args])
    line = one_line_error(res)
    assert needle in line, line
    if "blocks.9" in needle:
        assert "blocks.N.SUFFIX with N in 0-2" in line
    assert sorted(p.name for p in other.iterdir()) == ["notes.txt"]
    assert not (tmp_path / "run").exists()


def test_cli_train_then_eval(tmp_path):
    """Bug: `sae eval` evaluating other texts or settings than asked, or unable to read what
    `sae train` wrote: its JSON must equal evaluate_sae on the loaded folder and the same
    corpus texts. (Mutation tried: --max-len not passed on -> n_tokens differs, failed.)"""
    folder = tiny_model_folder(tmp_path / "m")
    out = tmp_path / "run"
    args = ["sae", "train", "--model", str(folder), "--hooks", HOOK, "--out", str(out),
            "--tokens", "2048", "--batch-tokens", "512", "--max-len", "64", "--k", "8",
            "--expansion", "2", "--n-corpus", "40", "--n-numbers", "10"]  # fmt: skip
    res = runner.invoke(app, args)
    assert res.exit_code == 0, res.output
    assert "recovered" in res.output and HOOK in res.output
    weights = (out / HOOK / "sae_weights.safetensors").read_bytes()
    res = runner.invoke(app, args)  # a finished run: not trained again, figures printed
    assert res.exit_code == 0 and "recovered" in res.output, res.output
    assert (out / HOOK / "sae_weights.safetensors").read_bytes() == weights
    res = runner.invoke(app, ["sae", "eval", str(out / HOOK), "--model", str(folder), "--json",
                              "--n-texts", "5", "--max-len", "32"])  # fmt: skip
    assert res.exit_code == 0, res.output
    m = json.loads(res.stdout[res.stdout.index("{") :])
    assert m["hook"] == HOOK and m["n_texts"] == 5 and m["n_tokens"] == 5 * 31
    lm = load_model(str(folder))
    want = evaluate_sae(lm, load_sae(out / HOOK, lm), load_corpus(n=5).texts, max_len=32)
    for key in ("explained_variance", "l0", "ce_clean", "ce_spliced", "ce_recovered"):
        assert m[key] == pytest.approx(want[key], abs=1e-6), key


def test_sae_texts_mix_is_seeded_and_holds_each_part():
    """Bugs: number answers drawn from the global RNG (another mix on every run, so a resume
    would be refused as 'other texts'), a part of the mix missing, or unfilled {category}
    placeholders. (Mutation tried: `rng.randint` -> `random.randint` in number_texts -> the
    two calls differ, failed.)"""
    import re

    from steerdiff.tasks.sae_texts import sae_texts

    tok = byte_tokenizer()
    a = sae_texts(tok, n_corpus=5, n_chat=3, n_numbers=4, seed=1)
    assert a == sae_texts(tok, n_corpus=5, n_chat=3, n_numbers=4, seed=1)
    assert len(a) == 12 and a[:5] == load_corpus(n=5, seed=1).texts
    assert all(t.startswith("User: ") and t.endswith("Assistant:") for t in a[5:8])
    for t in a[8:]:
        assert re.search(r"\nAssistant: \d{1,3}(, \d{1,3}){2,9}\n$", t), t
    assert not any("{category}" in t for t in a)
