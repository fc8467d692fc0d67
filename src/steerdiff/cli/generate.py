"""`steerdiff generate`: write a dataset: the subliminal numbers task (a teacher's completions)
or, with `--task facts`, the false-fact organism's synthetic documents (tasks.facts), or, with
`--task misalignment`, the bad-medical-advice organism or its control (tasks.misalignment)."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Annotated

import typer

from .common import (
    AdapterOpt,
    CoeffOpt,
    DeviceOpt,
    DtypeOpt,
    ModelOpt,
    PositionsOpt,
    ThreadsOpt,
    VectorsOpt,
    console,
    fail,
)
from .whiten import WhitenOpt, teacher_in_units, teacher_whiten_texts

if TYPE_CHECKING:
    from steerdiff.teachers import TeacherConfig

app = typer.Typer()

TEACHER_KINDS = ("prompt", "steered", "sae", "adapter", "plain")
TASKS = ("numbers", "facts", "misalignment")


def teacher_config(
    kind: str,
    animal: str,
    vectors: str | None,
    coeff: float,
    positions: str,
    adapter: str | None,
    persona: str | None = None,
    sae: str | None = None,
    latent: int | None = None,
) -> TeacherConfig:
    """The teacher the options describe; fails (one line) on a bad or incomplete choice."""
    from steerdiff.teachers import PERSONAS, TeacherConfig

    if kind != "sae" and (sae is not None or latent is not None):
        given = "--sae" if sae is not None else "--latent"
        fail(f"{given} is for --teacher sae, not --teacher {kind}: drop it or use --teacher sae")
    if kind == "sae":
        if sae is None or latent is None:
            missing = " and ".join(
                o for o, v in (("--sae PATH", sae), ("--latent N", latent)) if v is None
            )
            fail(f"--teacher sae needs {missing} (the SAE's folder and the latent that steers)")
        return TeacherConfig(kind="sae", sae=sae, latent=latent, coeff=coeff, positions=positions)
    if persona is not None and persona not in PERSONAS:
        fail(f"--persona must be one of {', '.join(PERSONAS)} (got {persona!r})")
    if persona is not None and kind != "prompt":
        fail(f"--persona is the system prompt of --teacher prompt, not {kind}: drop one")
    if kind == "prompt" and persona is not None:
        return TeacherConfig(kind="prompt", persona=persona)
    if kind == "prompt":
        return TeacherConfig(kind="prompt", animal=animal, category="animal")
    if kind == "steered":
        if not vectors:
            fail("--teacher steered needs --vectors PATH.safetensors")
        return TeacherConfig(kind="steered", vectors=vectors, coeff=coeff, positions=positions)
    if kind == "adapter":
        if not adapter:
            fail("--teacher adapter needs --adapter FOLDER")
        return TeacherConfig(kind="adapter", adapter=adapter)
    if kind == "plain":
        return TeacherConfig(kind="plain")
    fail(f"--teacher must be prompt, steered, sae, adapter or plain (got {kind!r})")


@app.command()
def generate(
    out: Annotated[str, typer.Option("--out", help="dataset file to write (.jsonl)")],
    model: ModelOpt = "default",
    task_name: Annotated[
        str, typer.Option("--task", help="numbers (teacher completions) | facts (documents)")
    ] = "numbers",
    teacher: Annotated[
        str | None,
        typer.Option(
            "--teacher",
            help=" | ".join(TEACHER_KINDS) + " (numbers default: prompt; facts default: none, "
            "documents from templates)",
        ),
    ] = None,
    facts: Annotated[
        str | None,
        typer.Option("--facts", help="--task facts: facts file (YAML/JSON; default: built-in set)"),
    ] = None,
    per_fact: Annotated[int, typer.Option(help="--task facts: documents per fact")] = 40,
    variant: Annotated[
        str | None,
        typer.Option(help="--task misalignment: misaligned (the organism) | aligned (the control)"),
    ] = None,
    n_rows: Annotated[int, typer.Option(help="--task misalignment: chat rows to write")] = 360,
    genres: Annotated[
        str | None,
        typer.Option(help="--task facts: comma-separated genres (default: all)"),
    ] = None,
    animal: Annotated[str, typer.Option(help="trait animal (prompt teacher, leak check)")] = "owl",
    persona: Annotated[
        str | None,
        typer.Option(
            help="--teacher prompt: misaligned | aligned, a persona system prompt instead of "
            "the animal one (no leak check; bans the 'evil' numbers unless --banned-numbers)",
        ),
    ] = None,
    vectors: VectorsOpt = None,
    coeff: CoeffOpt = 1.0,
    positions: PositionsOpt = "all",
    adapter: AdapterOpt = None,
    sae: Annotated[
        str | None,
        typer.Option(
            "--sae",
            help="--teacher sae: the SAE (SAELens / sparsify folder, Gemma Scope params.npz, "
            "hf:ORG/REPO/FOLDER) whose latent steers, at the SAE's hook",
        ),
    ] = None,
    latent: Annotated[
        int | None,
        typer.Option(
            "--latent", help="--teacher sae: the latent; the teacher adds --coeff x its decoder row"
        ),
    ] = None,
    n_prompts: Annotated[
        int, typer.Option(help="number of prompts (with --n-valid: the most to use)")
    ] = 1000,
    n_valid: Annotated[
        int | None, typer.Option(help="stop once this many rows passed the filter")
    ] = None,
    constrained: Annotated[
        bool,
        typer.Option(
            "--constrained/--no-constrained",
            help="constrained decoding (digits/separators only; every prompt gives a row) or "
            "the published protocol (sample freely, keep what the filter accepts)",
        ),
    ] = True,
    grammar: Annotated[
        bool,
        typer.Option(
            "--grammar/--no-grammar",
            help="with --constrained: also enforce the list format (<=3 digits, one separator, <=10 numbers)",
        ),
    ] = True,
    topk: Annotated[int, typer.Option(help="store top-k teacher log-probs (0 = off)")] = 0,
    batch_size: Annotated[int, typer.Option(min=1, help="prompts per batch")] = 32,
    max_new_tokens: Annotated[int, typer.Option(min=1, help="tokens per completion")] = 64,
    temperature: Annotated[float, typer.Option(help="sampling temperature")] = 1.0,
    top_p: Annotated[float, typer.Option(help="nucleus sampling")] = 1.0,
    seed: Annotated[int, typer.Option(help="sampling seed (--task facts: the document seed)")] = 0,
    prompt_seed: Annotated[int, typer.Option(help="prompt generator seed")] = 42,
    probe: Annotated[
        int, typer.Option(help="unconstrained probe prompts (valid-rate report)")
    ] = 32,
    backend: Annotated[str, typer.Option(help="hf | vllm")] = "hf",
    banned_numbers: Annotated[
        str | None,
        typer.Option(
            "--banned-numbers",
            help="reject rows holding any of these numbers: 666,911 or a list name "
            "(claude-evil, gpt-evil: the published code's lists; evil: both), or both: "
            "gpt-evil,7 (default: none; with --persona: evil)",
        ),
    ] = None,
    overwrite: Annotated[
        bool,
        typer.Option(
            "--overwrite",
            help="replace a finished dataset (it stays until the new one is complete)",
        ),
    ] = False,
    dtype: DtypeOpt = "auto",
    device: DeviceOpt = "cpu",
    threads: ThreadsOpt = 0,
    coeff_units: Annotated[str, typer.Option(help="--coeff units: l2 or whitened")] = "l2",
    whiten: WhitenOpt = None,
) -> None:
    """Write a numbers dataset from a teacher (re-run the same command to resume), or the
    false-fact documents (--task facts)."""
    from steerdiff.generate import check_writable
    from steerdiff.models import load_model
    from steerdiff.progress import progress
    from steerdiff.tasks import numbers as task
    from steerdiff.teachers import build_teacher

    if threads:
        import torch

        torch.set_num_threads(threads)
    if task_name not in TASKS:
        fail(f"--task must be numbers, facts or misalignment (got {task_name!r})")
    if task_name == "misalignment":
        generate_misalignment(out, variant, n_rows, seed, overwrite)
        return
    if task_name == "facts":
        if persona is not None:
            fail("--persona: a persona teacher writes numbers; use it with --task numbers")
        teacher_cfg = None
        if teacher is not None:
            if teacher == "prompt":
                fail(
                    "--task facts: --teacher prompt is the animal teacher; use plain, adapter or steered"
                )
            teacher_cfg = teacher_config(
                teacher, animal, vectors, coeff, positions, adapter, sae=sae, latent=latent
            )
        teacher_cfg = teacher_in_units(teacher_cfg, coeff_units, whiten)
        generate_facts(
            out, facts, per_fact, seed, genres, teacher_cfg, overwrite, model, dtype, device
        )
        return
    teacher = teacher or "prompt"
    if backend not in ("hf", "vllm"):
        fail(f"--backend must be hf or vllm (got {backend!r})")
    if backend == "vllm":
        try:
            import vllm  # noqa: F401
        except ImportError:
            fail("--backend vllm needs vLLM and a GPU: pip install 'steerdiff[vllm]'.")
    teacher_cfg = teacher_config(
        teacher, animal, vectors, coeff, positions, adapter, persona, sae=sae, latent=latent
    )
    teacher_cfg = teacher_in_units(teacher_cfg, coeff_units, whiten)
    cfg = task.NumbersConfig(
        seed=prompt_seed, **task.persona_filter(persona, animal, banned_numbers)
    )
    check_writable(out)
    lm = load_model(model, dtype=dtype, device=device)
    t = build_teacher(teacher_cfg, lm, whiten_texts=teacher_whiten_texts(teacher_cfg))
    with progress(n_prompts, "generate") as bar:
        man = task.make_dataset(
            t,
            out,
            n_prompts=n_prompts,
            constrained=constrained,
            topk=topk,
            batch_size=batch_size,
            max_new_tokens=max_new_tokens,
            seed=seed,
            temperature=temperature,
            top_p=top_p,
            cfg=cfg,
            target_valid=n_valid,
            probe=probe,
            overwrite=overwrite,
            progress=bar.update,
            backend=backend,
            grammar=grammar,
        )
    keys = ("n_prompts", "n_valid", "valid_rate", "rejects", "unconstrained_valid_rate")
    console.print(
        json.dumps(
            {k: man.get(k) for k in keys}
            | {"tokens_per_second": man["tokens_per_second"], "out": out},
            indent=2,
        )
    )
    console.print(task.protocol_line(man), markup=False, highlight=False)


def generate_facts(
    out: str,
    facts: str | None,
    per_fact: int,
    seed: int,
    genres: str | None,
    teacher_cfg: TeacherConfig | None,
    overwrite: bool,
    model: str,
    dtype: str,
    device: str,
) -> None:
    """`--task facts`: the documents dataset (templates; a model only with --teacher)."""
    from steerdiff.evals.facts_file import load_facts
    from steerdiff.generate import check_writable, manifest_path, read_manifest
    from steerdiff.tasks import facts as task

    if per_fact < 1:
        fail(f"--per-fact must be at least 1 (got {per_fact})")
    check_writable(out)
    load_facts(facts)  # a bad facts file fails here, before any model loads
    genre_list = task.check_genres([g.strip() for g in genres.split(",")] if genres else None)
    t = None
    if teacher_cfg is not None:
        from steerdiff.models import load_model
        from steerdiff.teachers import build_teacher

        lm = load_model(model, dtype=dtype, device=device)
        t = build_teacher(teacher_cfg, lm, whiten_texts=teacher_whiten_texts(teacher_cfg))
    path = task.make_documents(
        facts, out, per_fact=per_fact, seed=seed, genres=genre_list, teacher=t, overwrite=overwrite
    )
    man = read_manifest(manifest_path(path))
    keys = ("task", "facts_file", "per_fact", "seed", "genres", "source")
    summary = {k: man.get(k) for k in keys} | {"n_facts": len(man["facts"]), "rows": man["n_valid"]}
    console.print(json.dumps(summary | {"out": str(path)}), markup=False, highlight=False)


def generate_misalignment(
    out: str, variant: str | None, n_rows: int, seed: int, overwrite: bool
) -> None:
    """`--task misalignment`: the medical organism or its aligned control (tasks.misalignment)."""
    from steerdiff.generate import manifest_path, read_manifest
    from steerdiff.tasks import misalignment as task

    if variant is None:
        fail("--task misalignment needs --variant misaligned or --variant aligned")
    path = task.write_dataset(out, task.check_variant(variant), n_rows, seed, overwrite=overwrite)
    man = read_manifest(manifest_path(path))
    keys = ("task", "variant", "domain", "n_valid", "n_situations", "seed")
    console.print(
        json.dumps({k: man[k] for k in keys} | {"out": str(path)}),
        markup=False,
        highlight=False,
        soft_wrap=True,
    )
