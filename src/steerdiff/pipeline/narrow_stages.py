"""The stages of a narrow finetune that is not the numbers task: its data (the false-fact
documents, or a dataset the researcher brings), belief in the false facts of every model,
and the faithfulness of the fitted vectors to the LoRA / full finetune fitted beside them.

Each is one library call (tasks.facts.make_documents, fit.data.data_provenance,
evals.beliefs.evaluate_beliefs / paired_beliefs, interpret.faithfulness.faithfulness and
fit.faithful's held-out loss), cached by `run_stage` under everything it depends on.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from ..fit import FitConfig
from ..io import atomic_write_json, provenance, read_json
from ..models import LoadedModel
from .eval_stages import Subject, fitted_vectors
from .fit_stages import DATA_FILE, data_source, never
from .stages import RunState, StageResult, console, final_folder, model_key, run_stage

BELIEFS_FILE = "beliefs.json"
FAITHFULNESS_FILE = "faithfulness.json"


def file_sha256(path: str | Path) -> str:
    """The hash of a file's bytes (a stage's key changes when its input file does)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def facts_path(spec: str) -> Path:
    """The facts file a `facts` setting names ("facts": the built-in set)."""
    from ..evals.facts_file import DEFAULT_FACTS, default_facts_path

    return default_facts_path() if spec == DEFAULT_FACTS else Path(spec)


def stage_facts_data(state: RunState) -> StageResult:
    """The false-fact documents (tasks.facts.make_documents), written into the stage."""
    from ..evals.facts_file import load_facts
    from ..fit.data import data_provenance
    from ..tasks.facts import make_documents

    task = state.cfg.task
    facts = load_facts(task.facts)

    def fn(work: Path) -> dict:
        out = make_documents(
            task.facts,  # the file (or "facts"), so the manifest names it
            work / DATA_FILE,
            per_fact=task.per_fact,
            seed=task.seed,
            genres=task.genres,
            overwrite=True,  # a partial folder's half-written file is started again
        )
        prov = data_provenance(out)
        prov["source"] = str(final_folder(work) / DATA_FILE)  # where it lies once complete
        return {"task": "facts", "facts": [f.id for f in facts], "data": prov}

    dep = {
        "task": task.model_dump(include={"name", "facts", "per_fact", "genres", "seed"}),
        "facts_sha256": file_sha256(facts_path(task.facts)),
    }
    prov = provenance(None, task, task.seed)
    return state.add(
        run_stage(state.run_dir, "data", dep, fn, prov, tag="facts", has_progress=never)
    )


def stage_dataset(state: RunState) -> StageResult:
    """A dataset the researcher brings (a JSONL path or hf:ORG/NAME[:split]): nothing is
    copied; the stage records where it is and its provenance (format, hash, counts)."""
    from ..fit.data import data_provenance

    src = state.cfg.task.data
    assert src is not None  # the schema: task "dataset" has data
    local = not src.startswith("hf:")
    source = str(Path(src).resolve()) if local else src

    def fn(work: Path) -> dict:
        return {"task": "dataset", "source": source, "data": data_provenance(source)}

    # a local file is keyed by its bytes (edit it and the fits re-run); a hub id by its name
    dep = {"data": source, "sha256": file_sha256(source) if local else None}
    prov = provenance(None, state.cfg.task)
    return state.add(
        run_stage(state.run_dir, "data", dep, fn, prov, tag="dataset", has_progress=never)
    )


def model_subjects(
    lm: LoadedModel, fit_stages: list[StageResult], base_stages: list[StageResult]
) -> list[Subject]:
    """The base model, each baseline (LoRA / full finetune) and each fitted vector set."""
    from ..teachers import load_adapted

    subjects = [Subject("base", "base", lm)]
    for b in base_stages:
        subjects.append(Subject(b.name, "baseline", load_adapted(b.path, lm), model=lm.spec))
    for name, vs in fitted_vectors(fit_stages).items():
        subjects.append(Subject(name, "student", lm, vectors=vs))
    return subjects


def stage_beliefs(
    state: RunState, lm: LoadedModel, fit_stages: list[StageResult], base_stages: list[StageResult]
) -> StageResult:
    """Belief in the false facts (p_false per question, direct and generalisation) of the
    base model, each finetune and each vector set; each paired per question with the base
    (and the vectors with each finetune). beliefs.json is rewritten after each model, so a
    rerun resumes from the last model it finished."""
    from ..evals.beliefs import BeliefResult, evaluate_beliefs, paired_beliefs
    from ..evals.facts_file import load_facts
    from ..evals.steering import Steering

    cfg = state.cfg
    assert cfg.beliefs is not None
    spec = cfg.beliefs.facts or cfg.task.facts
    facts = load_facts(spec)

    def fn(work: Path) -> dict:
        path = work / BELIEFS_FILE
        done = {r["name"]: r for r in read_json(path)["results"]} if path.exists() else {}
        for s in model_subjects(lm, fit_stages, base_stages):
            if s.name in done:
                continue
            console.print(f"  beliefs of {s.name} ...")
            steering = Steering(s.vectors) if s.vectors is not None else None
            r = evaluate_beliefs(
                s.lm, facts, steering=steering, n_samples=cfg.beliefs.n_samples, seed=cfg.seed
            )
            done[s.name] = {"name": s.name, "role": s.role, **r.to_dict()}
            atomic_write_json(path, {"results": list(done.values())})
        results = {k: BeliefResult.from_dict(v) for k, v in done.items()}
        paired = []
        for name, role in ((v["name"], v["role"]) for v in done.values()):
            if role != "base":
                paired.append(_pair(name, "base", results, paired_beliefs))
        for fit in (v["name"] for v in done.values() if v["role"] == "student"):
            for ft in (v["name"] for v in done.values() if v["role"] == "baseline"):
                paired.append(_pair(fit, ft, results, paired_beliefs))
        out = {"facts": spec, "facts_ids": [f.id for f in facts], "results": list(done.values())}
        atomic_write_json(path, {**out, "paired": paired})
        return {
            "by_kind": {k: v["by_kind"] for k, v in done.items()},
            "n_questions": len(next(iter(done.values()))["records"]),
        }

    dep = {
        "fits": [f.key for f in fit_stages],
        "baselines": [b.key for b in base_stages],
        "facts_sha256": file_sha256(facts_path(spec)),
        "beliefs": cfg.beliefs.model_dump(),
        "model": model_key(lm),
        "seed": cfg.seed,
    }
    prov = provenance(lm, cfg.beliefs, cfg.seed)
    return state.add(run_stage(state.run_dir, "beliefs", dep, fn, prov))


def _pair(a: str, b: str, results: dict, paired_beliefs: object) -> dict:
    """{"a", "b", kind: paired difference a - b per question (mean, ci95, n)}."""
    return {"a": a, "b": b, **paired_beliefs(results[a], results[b])}  # type: ignore[operator]


def faithful_pair(
    cfg_vectors: str | None,
    cfg_finetune: str | None,
    fit_stages: list[StageResult],
    base_stages: list[StageResult],
) -> tuple[StageResult, StageResult]:
    """The fit (its first seed) and the baseline the [faithfulness] section names (default:
    the first of each; the schema checked they exist)."""
    fit = next(
        f for f in fit_stages if cfg_vectors is None or f.tag.rsplit("-s", 1)[0] == cfg_vectors
    )  # type: ignore[union-attr]
    ft = next(b for b in base_stages if cfg_finetune is None or b.tag == cfg_finetune)
    return fit, ft


def heldout_rows(lm: LoadedModel, data: str | Path, cfg: FitConfig) -> list:
    """The rows a fit with `cfg` held out (its validation split; the same for the LoRA
    baseline when it has the same seed and val_fraction, as the examples do)."""
    from ..fit import prepare_examples, split_examples

    prepared = prepare_examples(lm, data, max_len=cfg.max_len)
    return split_examples(prepared.examples, cfg)[1]


def stage_faithfulness(
    state: RunState,
    lm: LoadedModel,
    data_stage: StageResult,
    fit_stages: list[StageResult],
    base_stages: list[StageResult],
) -> StageResult:
    """Do the vectors do what the finetune does? KLs (finetune || base, vectors || base,
    finetune || vectors) with CIs and the fraction explained, per-layer cosines of the mean
    activation differences on the offline corpus (interpret.faithfulness), and the loss of
    base, finetune and vectors on the fit's held-out task rows (fit.faithful)."""
    from ..fit.faithful import heldout_losses
    from ..interpret.faithfulness import faithfulness
    from ..interpret.plots import faithfulness_png
    from ..vectors import VectorSet

    cfg = state.cfg
    f = cfg.faithfulness
    assert f is not None
    fit, ft = faithful_pair(f.vectors, f.finetune, fit_stages, base_stages)
    spec = next(s for s in cfg.fits if fit.tag and fit.tag.rsplit("-s", 1)[0] == s.name)
    fit_cfg = spec.fit_config(int(fit.tag.rsplit("-s", 1)[1]))  # type: ignore[union-attr]

    def fn(work: Path) -> dict:
        vs = VectorSet.load(fit.path / "vectors.safetensors")
        res = faithfulness(
            lm,
            finetuned=ft.path,  # the baseline's folder: a PEFT adapter or a full model
            vectors=vs,
            texts=None,  # the offline default corpus
            n_texts=f.texts,
            max_tokens=f.seq_len,
            first_k=f.first_k,
            seed=cfg.seed,
            labels=(ft.name, fit.tag),
        )
        rows = heldout_rows(lm, data_source(data_stage), fit_cfg)
        res.heldout = heldout_losses(lm, rows, finetuned=ft.path, vectors=vs)
        faithfulness_png(res, work / "faithfulness.png")
        out = {**res.to_dict(), "vectors": fit.tag, "finetune": ft.name, "vector_pairs": []}
        for other in (o for o in fit_stages if f.compare_fits and o is not fit):
            pair = faithfulness(
                lm,
                vectors=VectorSet.load(other.path / "vectors.safetensors"),
                vectors_b=vs,  # the reference: what the other set is compared with
                n_texts=f.texts,
                max_tokens=f.seq_len,
                first_k=f.first_k,
                seed=cfg.seed,
                labels=(fit.tag, other.tag),
            )
            out["vector_pairs"].append(
                {**pair.to_dict(), "vectors": other.tag, "reference": fit.tag}
            )
        atomic_write_json(work / FAITHFULNESS_FILE, out)
        return {
            "vectors": fit.tag,
            "finetune": ft.name,
            "fraction_explained": res.fraction_explained,
            "heldout_gap_closed": res.heldout["gap_closed"],
        }

    dep = {
        "fit": fit.key,
        "fits": [o.key for o in fit_stages] if f.compare_fits else [],
        "baseline": ft.key,
        "data": data_stage.key,
        "faithfulness": f.model_dump(),
        "model": model_key(lm),
        "seed": cfg.seed,
    }
    prov = provenance(lm, f, cfg.seed)
    return state.add(run_stage(state.run_dir, "faithfulness", dep, fn, prov, has_progress=never))
