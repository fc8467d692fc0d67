"""Data-parallel fitting with `accelerate launch --multi_gpu --num_processes 2` on CPU (torchrun
processes, gloo) equals one process. (`--cpu` makes accelerate start a single process.)"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

torch.set_num_threads(1)
TESTS = Path(__file__).parent

SCRIPT = r"""
import sys, torch
sys.path.insert(0, sys.argv[2])
torch.set_num_threads(1)
from test_train import HOOK, peaky_tiny
from steerdiff.fit import LoraConfig, fit_lora
from steerdiff.fit import random_vector, sample_examples
from steerdiff.fit import FitConfig, rank_world, annotate_topk, fit

def data():
    m = peaky_tiny()
    v = random_vector(m, HOOK, 16.0, seed=3)
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(2, 256, (6,), generator=g).tolist() for _ in range(48)]
    exs = sample_examples(m, prompts, {HOOK: v}, max_new_tokens=6)
    annotate_topk(m, exs, {"kind": "steered", "vectors": {HOOK: v}}, k=16)
    return m, v, exs

def run(out):
    m, v, exs = data()
    t = {"kind": "steered", "vectors": {HOOK: v}}
    cfg = FitConfig(hooks=[HOOK, "blocks.2.attn.hook_{q,v}"], objective="distill", batch_size=16,
                    micro_batch_size=8, epochs=2, lr=0.05, val_size=16, progress=False)
    vec = fit(m, exs, cfg, teacher=t)
    lora = fit_lora(m, exs, cfg.model_copy(update={"lr": 0.01}), LoraConfig(r=2), teacher=t)
    if rank_world()[0] == 0:
        torch.save({"vectors": dict(vec.vectors), "lora": lora.state,
                    "val": [vec.fitted_val_loss, lora.fitted_val_loss],
                    "world": rank_world()[1]}, out)

if __name__ == "__main__":
    run(sys.argv[1])
"""


@pytest.mark.skipif(
    shutil.which("accelerate") is None
    and not Path(sys.executable).with_name("accelerate").exists(),
    reason="accelerate CLI not installed",
)
def test_two_process_gloo_equals_single_process(tmp_path):
    script = tmp_path / "dp_fit.py"
    script.write_text(SCRIPT)
    accelerate = shutil.which("accelerate") or str(Path(sys.executable).with_name("accelerate"))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(TESTS.parent / "src")}
    cmd = [
        accelerate,
        "launch",
        "--multi_gpu",
        "--num_processes",
        "2",
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        "--main_process_port",
        "29517",
        str(script),
        str(tmp_path / "dp.pt"),
        str(TESTS),
    ]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=170)
    assert proc.returncode == 0, proc.stderr[-3000:]
    subprocess.run(
        [sys.executable, str(script), str(tmp_path / "one.pt"), str(TESTS)],
        env=env,
        check=True,
        capture_output=True,
        timeout=120,
    )
    dp, one = torch.load(tmp_path / "dp.pt"), torch.load(tmp_path / "one.pt")
    assert dp["world"] == 2 and one["world"] == 1
    assert set(dp["vectors"]) == set(one["vectors"]) and len(one["vectors"]) == 3
    for k in one["vectors"]:
        assert float(one["vectors"][k].norm()) > 0.01
        torch.testing.assert_close(dp["vectors"][k], one["vectors"][k], atol=1e-5, rtol=1e-4)
    for k in one["lora"]:
        torch.testing.assert_close(dp["lora"][k], one["lora"][k], atol=1e-5, rtol=1e-4)
    assert dp["val"] == pytest.approx(one["val"], rel=1e-5)
