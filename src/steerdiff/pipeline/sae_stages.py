"""The SAE stages (`[sae]` in an experiment file): every fitted vector set and every LoRA /
full-finetune baseline read in an SAE's latents.

- `stage_sae_train` (`[sae.train]`): trains the SAE(s) on the text mix of tasks.sae_texts
  (fit.sae_train.train_saes), cached like any stage; an interrupted training resumes from its
  checkpoint in the stage's .partial folder.
- `stage_sae_read`: interpret.sae_read.read_in_latents for each subject (decomposition of
  its vector at the SAE's hook, or of its mean activation difference there; mean change of
  each latent's activation on corpus text; dashboards of the top latents). sae.json is
  rewritten after each subject, so a rerun resumes from the last one finished.
"""

from __future__ import annotations

from pathlib import Path

from ..io import atomic_write_json, provenance, read_json
from ..models import LoadedModel
from ..sae import SAE, SAEError, load_sae
from .narrow_stages import model_subjects
from .stages import RunState, StageResult, console, model_key, run_stage

SAE_FILE = "sae.json"


def stage_sae_train(state: RunState, lm: LoadedModel) -> StageResult:
    """Train the [sae.train] SAEs (one SAELens folder per hook in the stage folder)."""
    from ..fit.sae_train import train_saes
    from ..tasks.sae_texts import sae_texts

    s = state.cfg.sae
    assert s is not None and s.train is not None
    t = s.train

    def fn(work: Path) -> dict:
        texts = sae_texts(lm.tokenizer, t.corpus, t.n_corpus, t.n_chat, t.n_numbers, t.seed)
        train_saes(lm, t, work, texts=texts, progress=True)
        return read_json(work / "metrics.json")

    dep = {"train": t.model_dump(), "model": model_key(lm)}
    prov = provenance(lm, t, t.seed)
    return state.add(run_stage(state.run_dir, "sae_train", dep, fn, prov))


def sae_of(state: RunState, lm: LoadedModel, trained: StageResult | None) -> SAE:
    """The SAE the [sae] section reads: `path` (local or hf:), or the trained one at `hook`."""
    s = state.cfg.sae
    assert s is not None
    if trained is None:
        assert s.path is not None
        return load_sae(s.path, lm, hook=s.hook)
    assert s.train is not None
    return load_sae(trained.path / (s.hook or s.train.hooks[-1]), lm)


def stage_sae_read(
    state: RunState,
    lm: LoadedModel,
    fit_stages: list[StageResult],
    base_stages: list[StageResult],
    trained: StageResult | None = None,
) -> StageResult:
    """Each vector set and baseline read in the SAE's latents (sae.json: {"sae", "results"})."""
    from ..interpret.corpus import load_corpus
    from ..interpret.sae_effects import check_reaches
    from ..interpret.sae_read import read_in_latents, sae_info

    cfg = state.cfg
    s = cfg.sae
    assert s is not None
    sae = sae_of(state, lm, trained)

    def read(subj, corpus) -> dict:
        """One subject's reading, or why it is skipped (its vectors all after the hook)."""
        if subj.vectors is not None:
            try:
                check_reaches(lm, subj.vectors, str(sae.hook))
            except SAEError as e:  # nothing to read there: say so in the file, go on
                return {"skipped": str(e)}
        return read_in_latents(
            lm,
            sae,
            vectors=subj.vectors,
            finetuned=subj.lm if subj.vectors is None else None,
            texts=corpus,
            max_tokens=s.max_tokens,
            first_k=s.first_k,
            top=s.top,
            n_dashboards=s.dashboards,
            progress=True,
        )

    def fn(work: Path) -> dict:
        path = work / SAE_FILE
        done = {r["name"]: r for r in read_json(path)["results"]} if path.exists() else {}
        corpus = load_corpus(s.corpus, n=s.texts, seed=cfg.seed)
        for subj in model_subjects(lm, fit_stages, base_stages):
            if subj.role == "base" or subj.name in done:
                continue
            console.print(f"  SAE reading of {subj.name} ...")
            done[subj.name] = {"name": subj.name, "role": subj.role, **read(subj, corpus)}
            atomic_write_json(path, {"sae": sae_info(sae), "results": list(done.values())})
        if not path.exists():  # nothing to read (no fits, no baselines): an empty file
            atomic_write_json(path, {"sae": sae_info(sae), "results": []})
        return {
            "sae": sae.name,
            "hook": sae.hook,
            "top_latent": {k: _top(v) for k, v in done.items()},
        }

    dep = {
        "fits": [f.key for f in fit_stages],
        "baselines": [b.key for b in base_stages],
        "sae_sha256": sae.source.get("sha256"),
        "hook": sae.hook,
        "sae": s.model_dump(exclude={"train", "path"}),
        "model": model_key(lm),
    }
    prov = provenance(lm, s, cfg.seed)
    return state.add(run_stage(state.run_dir, "sae", dep, fn, prov))


def _top(result: dict) -> int | None:
    up = result.get("effects_top", {}).get("all", {}).get("up") or []
    return int(up[0]["latent"]) if up else None
