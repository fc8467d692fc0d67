"""`steerdiff whiten fit | norm`: the Gaussian of a hook's activations (steerdiff.whiten) and
vectors measured in it; and the whitened-units options of `eval`, `sweep` and `generate`
(`--units whitened [--whiten FILE]`, `--coeff-units whitened`)."""

from __future__ import annotations

import json
from typing import Annotated, Any

import typer

from .common import CorpusOpt, DeviceOpt, DtypeOpt, ModelOpt, console, fail

app = typer.Typer(
    name="whiten",
    help="Whitening: fit a hook's Gaussian on corpus text; measure vectors in whitened units.",
    no_args_is_help=True,
)

UNITS = ("l2", "whitened")
UnitsOpt = Annotated[
    str,
    typer.Option(
        "--units",
        help="coeff units: l2 (coeff x the vector) or whitened (standard deviations of the "
        "data along the vector, under --whiten or a Gaussian fitted on the corpus)",
    ),
]
WhitenOpt = Annotated[
    str | None,
    typer.Option("--whiten", help="a saved Gaussian (steerdiff whiten fit) for --units whitened"),
]


def parse_shrinkage(text: str) -> str | float:
    """'ledoit-wolf' | 'none' | a weight in [0, 1]."""
    if text in ("ledoit-wolf", "none"):
        return text
    try:
        w = float(text)
    except ValueError:
        fail(f"--shrinkage must be ledoit-wolf, none or a weight in [0, 1] (got {text!r})")
    if not 0.0 <= w <= 1.0:
        fail(f"--shrinkage weight must be in [0, 1] (got {w})")
    return w


def check_units(units: str, whiten: str | None, option: str = "--units") -> None:
    if units not in UNITS:
        fail(f"{option} must be l2 or whitened (got {units!r})")
    if whiten is not None and units != "whitened":
        fail(f"--whiten is a Gaussian for {option} whitened: add {option} whitened or drop it")


def steering_in_units(lm: Any, steering: Any, units: str, whiten: str | None, n_texts: int = 100):
    """`eval`'s Steering with coeff in --units: as it is for l2; for whitened, each vector at
    1 whitened unit under --whiten (checked: its hook and model) or a Gaussian fitted on
    n_texts corpus texts."""
    check_units(units, whiten)
    if steering is None or units == "l2":
        if units == "whitened":
            fail("--units whitened scales --vectors: give --vectors")
        return steering
    from steerdiff.interpret.corpus import load_corpus
    from steerdiff.whiten import Gaussian, place_gaussian, resolve_gaussians

    hooks = list(steering.vectors)
    given = place_gaussian(Gaussian.load(whiten), hooks) if whiten else {}
    texts = None if set(hooks) <= set(given) else load_corpus(n=n_texts).texts
    return steering.in_whitened_units(resolve_gaussians(lm, hooks, given, texts))


def teacher_in_units(cfg: Any, coeff_units: str, whiten: str | None) -> Any:
    """`generate`'s TeacherConfig with --coeff-units (and --whiten) set (validated)."""
    check_units(coeff_units, whiten, "--coeff-units")
    if coeff_units == "l2" or cfg is None:
        return cfg
    from steerdiff.teachers import TeacherConfig

    if cfg.kind not in ("steered", "sae"):
        fail(f"--coeff-units whitened is for --teacher steered or sae, not {cfg.kind}")
    return TeacherConfig(
        **cfg.model_dump(exclude_unset=True), coeff_units="whitened", whiten=whiten
    )


def teacher_whiten_texts(cfg: Any) -> list[str] | None:
    """Corpus texts to fit a whitened teacher's Gaussian on (None when it needs none)."""
    from steerdiff.pipeline.whitened_teacher import teacher_whiten_texts as texts_for

    return texts_for(cfg)


@app.command("fit")
def fit(
    hook: Annotated[str, typer.Option(help="the hook, e.g. blocks.12.hook_resid_post")],
    out: Annotated[str, typer.Option(help="the Gaussian's .safetensors file")],
    model: ModelOpt = "default",
    texts: Annotated[int, typer.Option("--texts", help="corpus texts (a seeded subset)")] = 200,
    max_tokens: Annotated[int, typer.Option(help="tokens per text")] = 64,
    shrinkage: Annotated[
        str, typer.Option(help="ledoit-wolf, none, or a weight in [0, 1]")
    ] = "ledoit-wolf",
    corpus: CorpusOpt = "default",
    seed: Annotated[int, typer.Option(help="seed of the corpus subset")] = 0,
    overwrite: Annotated[bool, typer.Option(help="replace an existing --out")] = False,
    dtype: DtypeOpt = "auto",
    device: DeviceOpt = "cpu",
) -> None:
    """Fit the mean and (shrunk) covariance of --hook's activations on corpus text; save them."""
    from pathlib import Path

    from steerdiff.interpret.corpus import load_corpus
    from steerdiff.models import load_model
    from steerdiff.whiten import fit_gaussian

    if Path(out).exists() and not overwrite:
        fail(f"--out {out} exists; pass --overwrite to replace it, or choose another path.")
    if texts < 1 or max_tokens < 2:
        fail(f"--texts must be >= 1 and --max-tokens >= 2 (got {texts}, {max_tokens})")
    w = parse_shrinkage(shrinkage)
    lm = load_model(model, dtype=dtype, device=device)
    docs = load_corpus(None if corpus == "default" else corpus, n=texts, seed=seed)
    g = fit_gaussian(lm, hook, docs.texts, max_tokens=max_tokens, shrinkage=w, progress=True)
    g.meta |= {"corpus": docs.source, "seed": seed}
    g.save(out)
    console.print(
        f"{hook}: {g.n_tokens} tokens from {g.meta['n_texts']} texts, d {g.dim}, shrinkage "
        f"{g.shrinkage:.4f}, trace {float(g.cov.trace()):.6g}; wrote {out}",
        soft_wrap=True,
    )


@app.command("norm")
def norm(
    vectors: Annotated[str, typer.Argument(help="a VectorSet (.safetensors)")],
    gaussian: Annotated[
        list[str], typer.Option("--gaussian", help="a saved Gaussian (repeat: one per hook)")
    ],
    out: Annotated[str | None, typer.Option(help="also write the figures as JSON")] = None,
) -> None:
    """For each hook of VECTORS: L2 norm, Mahalanobis norm, the data's spread along it, and
    the L2 coeff of 1 whitened unit (under the Gaussian fitted at that hook)."""
    from rich.table import Table

    from steerdiff.io import atomic_write_json
    from steerdiff.vectors import VectorSet
    from steerdiff.whiten import Gaussian, WhitenError, vector_figures

    vs = VectorSet.load(vectors)
    gs = [Gaussian.load(p) for p in gaussian]
    by_hook = {g.hook: (g, p) for g, p in zip(gs, gaussian, strict=True)}
    want = vs.metadata.get("weights_hash")
    rows: dict[str, dict] = {}
    for hook, v in vs.items():
        if hook not in by_hook:
            if len(vs) == 1 and len(gs) == 1:  # one vector, one Gaussian: of another hook
                raise WhitenError(
                    f"--gaussian {gaussian[0]} was fitted at {gs[0].hook}, not {hook} (the hook "
                    f"of {vectors}): fit one at {hook} (steerdiff whiten fit --hook {hook})."
                )
            raise WhitenError(
                f"No --gaussian for {hook} of {vectors} (given: {', '.join(by_hook)}): fit one "
                f"with steerdiff whiten fit --hook {hook}."
            )
        g, path = by_hook[hook]
        have = g.meta.get("weights_hash")
        if want and have and want != have:
            raise WhitenError(
                f"--gaussian {path} was fitted on model {g.meta.get('model')!r} (weights "
                f"{str(have)[:12]}), but {vectors} was made on {vs.metadata.get('model_id')!r} "
                f"({str(want)[:12]}): fit the Gaussian on the vectors' model."
            )
        rows[hook] = vector_figures(g, v)
    t = Table(title=f"{vectors} in whitened units")
    for col in ("hook", "L2 norm", "Mahalanobis norm", "spread", "L2 coeff of 1 unit"):
        t.add_column(col)
    for hook, f in rows.items():
        t.add_row(
            hook,
            f"{f['l2_norm']:.6g}",
            f"{f['mahalanobis_norm']:.6g}",
            f"{f['spread']:.6g}",
            f"{f['l2_coeff_per_whitened_unit']:.6g}",
        )
    console.print(t)
    if out is not None:
        atomic_write_json(out, {"vectors": vectors, "gaussians": gaussian, "hooks": rows})
        console.print(f"wrote {out}")
    else:
        console.print(json.dumps(rows), soft_wrap=True, markup=False, highlight=False)
