"""`steerdiff run EXPERIMENT` and `steerdiff demo`."""

from __future__ import annotations

import time
from importlib.resources import files
from pathlib import Path
from typing import Annotated

import typer

from .common import ThreadsOpt

app = typer.Typer()
RunDtypeOpt = Annotated[
    str | None,
    typer.Option(
        "--dtype",
        help="override the experiment file's dtype: auto (bfloat16 on CUDA and on CPUs with "
        "AMX, else float32), float32 or bfloat16",
        show_default=False,
    ),
]


def use_threads(threads: int) -> None:
    """torch's CPU threads (0: leave torch's default)."""
    if threads:
        import torch

        torch.set_num_threads(threads)


def demo_config_path() -> Path:
    """The built-in demo experiment file (data/demo.toml)."""
    return Path(str(files("steerdiff").joinpath("data/demo.toml")))


@app.command()
def run(
    experiment: Annotated[
        Path, typer.Argument(help="experiment file (.toml or .yaml); see examples/")
    ],
    runs_dir: Annotated[Path, typer.Option(help="where run folders go")] = Path("runs"),
    threads: ThreadsOpt = 0,
    dtype: RunDtypeOpt = None,
) -> None:
    """Run an experiment: cached, resumable stages; ends with report.html in the run folder.

    Everything that needs the model (model paths, hook names, fit settings) is checked
    before the first stage runs; a bad setting is one line naming the file and key."""
    from steerdiff.pipeline import load_config, run_experiment

    cfg = load_config(experiment, dtype=dtype)
    use_threads(threads)
    t0 = time.perf_counter()
    summary = run_experiment(cfg, runs_dir)
    typer.echo(f"Finished in {time.perf_counter() - t0:.0f}s. Open {summary.report}")


@app.command()
def demo(
    runs_dir: Annotated[Path, typer.Option(help="where the run folder goes")] = Path("runs"),
    print_config: Annotated[
        bool, typer.Option("--print-config", help="show the experiment file and exit")
    ] = False,
    threads: ThreadsOpt = 0,
    dtype: RunDtypeOpt = None,
) -> None:
    """The end-to-end demo on the embedded model (about 10 minutes on 2 CPU cores)."""
    from steerdiff.pipeline import load_config, run_experiment

    path = demo_config_path()
    if print_config:
        typer.echo(path.read_text())
        return
    use_threads(threads)
    t0 = time.perf_counter()
    summary = run_experiment(load_config(path, dtype=dtype), runs_dir)
    typer.echo(
        f"Demo finished in {time.perf_counter() - t0:.0f}s. Report: {summary.report.resolve()}"
    )
