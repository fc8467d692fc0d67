"""`steerdiff read ...`: read vectors (dla, lens, similarity, monitor), token entanglement, and
the faithfulness of vectors to a finetune."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from .common import CorpusOpt, DtypeOpt, FirstKOpt, ModelOpt, TokensOpt, console, fail
from .read_faithfulness import faithfulness_cmd

app = typer.Typer(
    name="read",
    help="Read vectors: direct logit attribution, activation-difference lens, similarity, monitoring.",
    no_args_is_help=True,
)

OutOpt = Annotated[str, typer.Option("--out", help="output folder (JSON, CSV, PNG)")]


@app.command("dla")
def dla(
    vectors: Annotated[str, typer.Argument(help="VectorSet file (.safetensors)")],
    out: OutOpt = "runs/read_dla",
    model: ModelOpt = "default",
    dtype: DtypeOpt = "auto",
    hook: Annotated[
        list[str] | None,
        typer.Option(
            "--hook", help="hook(s) to read (default: all residual-space hooks of the set)"
        ),
    ] = None,
    k: Annotated[int, typer.Option("-k", help="top/bottom tokens")] = 20,
    no_center: Annotated[
        bool, typer.Option("--no-center", help="do not centre the unembedding")
    ] = False,
    no_norm: Annotated[
        bool, typer.Option("--no-norm", help="leave out the final norm's scale")
    ] = False,
) -> None:
    """Centred direct logit attribution of each vector: top promoted / suppressed tokens.

    Example: steerdiff read dla runs/owl/vectors.safetensors --hook blocks.24.hook_resid_post
    """
    from steerdiff.interpret import direct_logit_attribution, dla_table
    from steerdiff.interpret.plots import token_bars_png
    from steerdiff.io import atomic_write_json, atomic_write_text, provenance
    from steerdiff.models import load_model
    from steerdiff.vectors import VectorSet

    lm = load_model(model, dtype=dtype)
    vs = VectorSet.load(vectors, lm)
    if hook:
        results = [direct_logit_attribution(lm, vs, h, k, not no_center, not no_norm) for h in hook]
        skipped: dict[str, str] = {}
    else:
        results, skipped = dla_table(lm, vs, k, not no_center, not no_norm)
    o = Path(out)
    rows = ["hook,rank,side,token_id,token,score"]
    for r in results:
        for side, items in (("top", r.top), ("bottom", r.bottom)):
            for i, t in enumerate(items):
                rows.append(
                    f"{r.hook},{i + 1},{side},{t.token_id},{json.dumps(t.token)},{t.score:.6g}"
                )
        token_bars_png(r, o / f"dla_{r.hook}.png", n=k)
        console.print(
            f"[bold]{r.hook}[/] |v|={r.vector_norm:.3g}  top: "
            + " ".join(repr(t.token) for t in r.top[:10])
        )
        console.print("   bottom: " + " ".join(repr(t.token) for t in r.bottom[:10]))
    for h, why in skipped.items():
        console.print(f"[yellow]skipped {h}[/]: {why}")
    atomic_write_json(
        o / "dla.json",
        {
            "results": [r.to_dict() for r in results],
            "skipped": skipped,
            "vectors": vectors,
            "provenance": provenance(lm),
        },
    )
    atomic_write_text(o / "dla.csv", "\n".join(rows) + "\n")
    console.print(f"wrote {o}/dla.json, dla.csv, dla_*.png")


@app.command("lens")
def lens(
    out: OutOpt = "runs/read_lens",
    vectors: Annotated[
        str | None, typer.Option("--vectors", help="VectorSet added to the model")
    ] = None,
    finetuned: Annotated[
        str | None,
        typer.Option("--finetuned", help="finetuned model (spec/folder) or LoRA adapter folder"),
    ] = None,
    model: ModelOpt = "default",
    dtype: DtypeOpt = "auto",
    corpus: CorpusOpt = "default",
    n: Annotated[int | None, typer.Option("--n", help="number of texts (default: all)")] = 500,
    tokens: TokensOpt = 64,
    first_k: FirstKOpt = 5,
    hooks: Annotated[
        str, typer.Option("--hooks", help="hooks to record (glob)")
    ] = "blocks.*.hook_resid_post",
    coeff: Annotated[float, typer.Option(help="multiplier of the vectors")] = 1.0,
    skip_first: Annotated[
        int, typer.Option(help="positions left out of the all-position mean")
    ] = 0,
    batch_size: Annotated[int, typer.Option(help="texts per forward")] = 16,
    k: Annotated[int, typer.Option("-k", help="top tokens per row")] = 20,
    find: Annotated[
        str | None, typer.Option("--find", help="comma-separated words to locate in the top-k")
    ] = None,
) -> None:
    """Activation-difference lens: mean activation differences per position and overall.

    Example: steerdiff read lens --vectors runs/owl/vectors.safetensors --n 500 --tokens 64 --find owl
    """
    from steerdiff.interpret import activation_difference_lens, save_lens
    from steerdiff.models import load_model
    from steerdiff.vectors import VectorSet

    lm = load_model(model, dtype=dtype)
    vs = VectorSet.load(vectors, lm) if vectors else None
    res = activation_difference_lens(
        lm,
        corpus,
        vectors=vs,
        finetuned=finetuned,
        hooks=hooks,
        coeff=coeff,
        first_k=first_k,
        max_tokens=tokens,
        batch_size=batch_size,
        skip_first=skip_first,
        n_texts=n,
    )
    ro = res.read(lm, k=k)
    paths = save_lens(out, res, ro, lm)
    console.print(f"lens: {res.n_texts} texts, {res.n_tokens} tokens, {res.meta['seconds']}s")
    for r in ro.logits:
        console.print(f"  logits pos {r.position}: " + " ".join(repr(t.token) for t in r.top[:10]))
    if find:
        hits = ro.find([w.strip() for w in find.split(",") if w.strip()], k)
        console.print(
            f"  '{find}' in top {k}: "
            + (", ".join(f"{h['hook']}@{h['position']}#{h['rank']}" for h in hits[:20]) or "none")
        )
    console.print("wrote " + ", ".join(str(p) for p in paths.values()))


app.command("faithfulness")(faithfulness_cmd)


@app.command("similarity")
def similarity(
    sets: Annotated[list[str], typer.Argument(help="VectorSet files (label=path or path)")],
    out: OutOpt = "runs/read_similarity",
    model: ModelOpt = "default",
    dtype: DtypeOpt = "auto",
    contrast: Annotated[
        str | None,
        typer.Option(
            "--contrast", help="contrast VectorSet (e.g. per-layer), compared with each set"
        ),
    ] = None,
    effects: Annotated[
        bool, typer.Option("--effects", help="also correlate mean logit differences on the corpus")
    ] = False,
    corpus: Annotated[str, typer.Option("--corpus")] = "default",
    n: Annotated[int, typer.Option("--n", help="texts for --effects")] = 100,
    tokens: Annotated[int, typer.Option("--tokens")] = 64,
) -> None:
    """Cosine matrices between sets per hook, sets vs a contrast per layer, and effects.

    Example: steerdiff read similarity seed0=a.safetensors seed1=b.safetensors --effects
    """
    from steerdiff.interpret import (
        cosine_matrices,
        cross_cosine,
        effect_correlation,
        effect_vectors,
    )
    from steerdiff.interpret.plots import heatmap_png
    from steerdiff.io import atomic_write_json, atomic_write_text
    from steerdiff.models import load_model
    from steerdiff.vectors import VectorSet, VectorSetError

    labelled = {}
    for s in sets:
        label, _, path = s.rpartition("=")
        labelled[label or Path(path).stem] = path
    if effects and len(labelled) < 2:
        fail("--effects needs at least two sets to correlate.")
    loaded = {lab: VectorSet.load(p) for lab, p in labelled.items()}
    o = Path(out)
    report: dict = {}
    if len(loaded) >= 2:
        try:
            mats = cosine_matrices(loaded)
        except VectorSetError as e:  # sets on different hooks: skip this table, keep the rest
            console.print(f"[yellow]no per-hook cosine:[/] {e}")
            mats = {}
        for h, m in mats.items():
            heatmap_png(m, o / f"cosine_{h}.png")
            atomic_write_text(o / f"cosine_{h}.csv", m.to_csv())
        if mats:
            report["cosine"] = {h: m.to_dict() for h, m in mats.items()}
    if contrast:
        c = VectorSet.load(contrast)
        report["contrast"] = {}
        for lab, vs in loaded.items():
            m = cross_cosine(vs, c, f"{lab} vs contrast")
            heatmap_png(m, o / f"contrast_{lab}.png")
            atomic_write_text(o / f"contrast_{lab}.csv", m.to_csv())
            report["contrast"][lab] = m.to_dict()
    if effects:
        lm = load_model(model, dtype=dtype)
        for vs in loaded.values():
            vs.check_fits(lm.model)
        eff = effect_vectors(lm, loaded, corpus, n_texts=n, max_tokens=tokens, first_k=1)
        m = effect_correlation(eff)
        heatmap_png(m, o / "effects.png")
        atomic_write_text(o / "effects.csv", m.to_csv())
        report["effects"] = m.to_dict()
    atomic_write_json(o / "similarity.json", report)
    for key, val in report.items():
        n_tables = 1 if key == "effects" else len(val)
        console.print(f"[bold]{key}[/]: {n_tables} table(s)")
    console.print(f"wrote {o}/similarity.json and PNG/CSV tables")


@app.command("monitor")
def monitor(
    vectors: Annotated[str, typer.Argument(help="VectorSet file")],
    rows: Annotated[str, typer.Argument(help=".jsonl (rows with 'messages' or 'text') or .txt")],
    out: OutOpt = "runs/read_monitor",
    model: ModelOpt = "default",
    dtype: DtypeOpt = "auto",
    hook: Annotated[str | None, typer.Option("--hook", help="the set's hook to project on")] = None,
    role: Annotated[
        str, typer.Option(help="chat tokens counted: assistant | user | all")
    ] = "assistant",
    baseline: Annotated[
        str | None, typer.Option("--baseline", help="reference rows for z-scores")
    ] = None,
    flag_z: Annotated[float, typer.Option(help="flag rows with z above this")] = 2.0,
) -> None:
    """Project activations onto a vector per token; flag rows that push toward it.

    Example: steerdiff read monitor owl.safetensors data/owl_numbers.jsonl --hook blocks.24.hook_resid_post
    """
    from steerdiff.interpret import project, save_monitor
    from steerdiff.interpret.monitor import load_rows
    from steerdiff.models import load_model
    from steerdiff.vectors import VectorSet

    lm = load_model(model, dtype=dtype)
    vs = VectorSet.load(vectors, lm)
    base = load_rows(baseline) if baseline else None
    res = project(lm, vs, rows, hook=hook, role=role, baseline=base, flag_z=flag_z)
    paths = save_monitor(out, res, lm)
    console.print(
        f"{len(res.items)} rows; reference mean {res.reference_mean:.3g} sd {res.reference_std:.3g}; "
        f"flagged {len(res.flagged)}: {res.flagged[:20]}"
    )
    console.print("wrote " + ", ".join(str(p) for p in paths.values()))


@app.command("entanglement")
def entanglement(
    trait: Annotated[str, typer.Option("--trait", help="an animal of the category, e.g. owl")],
    out: OutOpt = "runs/read_entanglement",
    model: ModelOpt = "default",
    dtype: DtypeOpt = "auto",
    prompts: Annotated[
        int, typer.Option("--prompts", help="number prompts (tasks.numbers, seed 42)")
    ] = 64,
    top: Annotated[int, typer.Option("--top", help="entangled numbers reported and prompted")] = 5,
    min_prob: Annotated[
        float, typer.Option("--min-prob", help="rank only numbers at least this likely (trait)")
    ] = 1e-4,
    teacher_data: Annotated[
        str | None, typer.Option("--teacher-data", help="the trait teacher's numbers dataset")
    ] = None,
    base_data: Annotated[
        str | None, typer.Option("--base-data", help="the base model's numbers dataset")
    ] = None,
    questions: Annotated[
        int | None, typer.Option("--questions", help="preference questions (default: all 50)")
    ] = None,
    controls: Annotated[
        int, typer.Option("--controls", help="random number sets (subliminal control)")
    ] = 3,
    no_subliminal: Annotated[
        bool, typer.Option("--no-subliminal", help="skip the subliminal-prompting shares")
    ] = False,
) -> None:
    """Token entanglement: numbers the trait prompt makes likelier, their frequency in a
    teacher's data, and the trait share with them in a system prompt ("subliminal prompting").

    Example: steerdiff read entanglement --trait owl --prompts 64 --top 5 --out runs/owl/entanglement
    """
    from steerdiff.evals import exact_preference, load_category
    from steerdiff.generate import load_dataset
    from steerdiff.interpret.entanglement import check_trait, frequency_shift, token_entanglement
    from steerdiff.interpret.plots import entanglement_bars_png
    from steerdiff.interpret.subliminal import EntanglementReport, subliminal_prompting
    from steerdiff.io import atomic_write_json, provenance
    from steerdiff.models import load_model
    from steerdiff.tasks.numbers import make_prompts

    animals = load_category("animals").candidates
    if check_trait(trait) not in [a.lower() for a in animals]:
        fail(f"bad option --trait: {trait!r} is not one of {', '.join(animals)}; pick one.")
    for name, val, lo in (
        ("--prompts", prompts, 1),
        ("--top", top, 1),
        ("--controls", controls, 1),
    ):
        if val < lo:
            fail(f"bad option {name}: must be >= {lo}, got {val}.")
    if (teacher_data is None) != (base_data is None):
        fail("--teacher-data and --base-data go together: pass both datasets (or neither).")
    if teacher_data and base_data:
        for path in (teacher_data, base_data):
            load_dataset(path)  # a missing or broken file stops here, before any scoring
    lm = load_model(model, dtype=dtype)
    ent = token_entanglement(lm, trait, make_prompts(prompts), top=top, min_prob=min_prob)
    nums = ent.numbers()
    freq = frequency_shift(nums, teacher_data, base_data) if teacher_data and base_data else None
    sub = None
    if not no_subliminal:
        sub = subliminal_prompting(
            trait,
            nums,
            lambda sp: exact_preference(lm, trait, n_questions=questions, system_prompt=sp),
            n_controls=controls,
        )
    rep = EntanglementReport(ent, freq, sub, {"model": model, "provenance": provenance(lm)})
    o = Path(out)
    atomic_write_json(o / "entanglement.json", rep.to_dict())
    entanglement_bars_png(ent, o / "entanglement.png")
    console.print(
        f"[bold]{ent.trait}[/]: top numbers over {ent.n_prompts} prompts (log-ratio, 95% CI)"
    )
    for e in ent.top:
        console.print(f"  {e.number:>3} {e.log_ratio:+.3f} [{e.ci95[0]:+.3f}, {e.ci95[1]:+.3f}]")
    if freq:
        console.print(
            f"dataset share of these numbers: teacher {100 * freq.set_teacher_rate:.3f}% vs base "
            f"{100 * freq.set_base_rate:.3f}% (difference 95% CI {100 * freq.set_difference_ci95[0]:+.3f}"
            f" to {100 * freq.set_difference_ci95[1]:+.3f} points)"
        )
    if sub:
        d = sub.entangled_minus_random
        console.print(
            f"{ent.trait} share: entangled numbers {100 * sub.entangled.target_rate:.2f}%, random "
            f"{100 * sub.random_rate:.2f}%, no system prompt {100 * sub.none.target_rate:.2f}%; "
            f"entangled - random {100 * d[0]:+.2f} [{100 * d[1][0]:+.2f}, {100 * d[1][1]:+.2f}] points"
        )
    console.print(f"wrote {o}/entanglement.json, entanglement.png")
