"""Experiments: an experiment file -> cached, resumable stages -> a run folder with a report.

    cfg = load_config("examples/adam_vs_sgd.toml")   # validated before anything runs
    summary = run_experiment(cfg, "runs")            # runs/adam-vs-sgd/report.html

config: the experiment schema; checks: what needs the model, checked before the first
stage; stages: content-addressed stages; fit_stages / eval_stages / narrow_stages (the
facts / dataset tasks' data, beliefs, faithfulness): the stage functions; run: the order
they run in.
"""

from .checks import check_experiment, load_models
from .config import (
    BaselineSpec,
    BeliefsConfig,
    ConfigError,
    EvalConfig,
    ExperimentConfig,
    FaithfulnessConfig,
    FitSpec,
    ReadConfig,
    TaskConfig,
    load_config,
    parse_config,
)
from .run import RunSummary, load_results, run_experiment
from .stages import StageResult, run_stage, stage_key

__all__ = [
    "BaselineSpec",
    "BeliefsConfig",
    "ConfigError",
    "EvalConfig",
    "ExperimentConfig",
    "FaithfulnessConfig",
    "FitSpec",
    "ReadConfig",
    "RunSummary",
    "StageResult",
    "TaskConfig",
    "check_experiment",
    "load_config",
    "load_models",
    "load_results",
    "parse_config",
    "run_experiment",
    "run_stage",
    "stage_key",
]
