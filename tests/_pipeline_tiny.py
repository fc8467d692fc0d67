"""Tiny stand-ins for the embedded models, saved as model folders an experiment file can name.

Same family, same layer count and same tokenizer (SmolLM2's, chat template included) as the
real ones, but 32 wide, so an experiment written for SmolLM2-135M (hooks at blocks.24) or
Gemma 3 270M (18 layers) runs unchanged on them in seconds. Random weights: the numbers a
run prints are meaningless, what it does (stages, files, errors) is the real thing.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import tomllib
import torch
import yaml
from transformers import AutoConfig, AutoModelForCausalLM

from steerdiff.models import LoadedModel

WIDTH = dict(
    hidden_size=32,
    intermediate_size=64,
    num_attention_heads=2,
    num_key_value_heads=1,
    head_dim=16,
    max_position_embeddings=512,
)
SMOLLM_LAYERS = 30  # SmolLM2-135M
GEMMA_LAYERS = 18  # Gemma 3 270M


def save_tiny(
    folder: Path, like: LoadedModel, model_type: str, n_layers: int, seed: int = 0
) -> Path:
    """A random `model_type` model with n_layers, using like's tokenizer, saved to folder."""
    tok = like.tokenizer
    extra = {"sliding_window": 64} if model_type.startswith("gemma") else {}
    cfg = AutoConfig.for_model(
        model_type,
        num_hidden_layers=n_layers,
        vocab_size=len(tok),
        pad_token_id=tok.pad_token_id,
        eos_token_id=tok.eos_token_id,
        bos_token_id=tok.bos_token_id,
        **WIDTH,
        **extra,
    )
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def tiny_pair(root: Path, smollm: LoadedModel) -> tuple[Path, Path]:
    """(a SmolLM2-shaped llama, a Gemma-3-270M-shaped gemma3_text) under root, made once."""
    teacher, student = root / "tiny-smollm", root / "tiny-gemma"
    if not (teacher / "config.json").exists():
        save_tiny(teacher, smollm, "llama", SMOLLM_LAYERS)
    if not (student / "config.json").exists():
        save_tiny(student, smollm, "gemma3_text", GEMMA_LAYERS, seed=1)
    return teacher, student


def shrink(raw: dict, n_prompts: int = 8, steps: int = 2, questions: int = 2) -> dict:
    """An experiment dict at tiny scale: few prompts, a few fit steps, few questions, a
    short lens; everything else (teacher, hooks, objectives, seeds) as the file says."""
    out = {**raw}
    out["task"] = {**raw.get("task", {}), "n_prompts": n_prompts, "batch_size": 8}
    out["task"]["max_new_tokens"] = min(out["task"].get("max_new_tokens", 56), 24)
    out["fits"] = [
        {**f, "max_steps": steps, "batch_size": 4, "checkpoint_every": 1}
        for f in raw.get("fits", [])
    ]
    out["baselines"] = [
        {**b, "max_steps": steps, "batch_size": 4} for b in raw.get("baselines", [])
    ]
    out["eval"] = {**raw.get("eval", {}), "n_questions": questions, "n_samples": 2}
    out["read"] = {**raw.get("read", {}), "lens_texts": 2, "lens_seq_len": 8}
    return out


def load_toml(path: Path) -> dict:
    return tomllib.loads(path.read_text())


def write_yaml(path: Path, raw: dict) -> Path:
    """An experiment dict as a YAML experiment file (load_config reads .yaml like .toml)."""
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def cli(*args: str, env: dict[str, str] | None = None) -> subprocess.Popen:
    """`python -m steerdiff.cli ARGS` in a subprocess (stdout and stderr together); env adds
    variables to this process's environment."""
    return subprocess.Popen(
        [sys.executable, "-m", "steerdiff.cli", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1", "COLUMNS": "400", **(env or {})},
    )
