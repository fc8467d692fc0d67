"""Fraction of the base-to-teacher loss gap closed by fitted vector sets (and LoRA r=8).

Teacher: the embedded SmolLM2-135M-Instruct with the owl trait system prompt. It writes
number lists through the library's own dataset path (constrained decoding + format
grammar, top-20 log-probs stored per token); the student sees the same user prompts
without the system prompt (SmolLM2's template then inserts its default one). We fit,
on the same rows, with top-k distillation (--objective sft for cross-entropy):
  qkv        biases at blocks.*.attn.hook_{q,k,v}   (every layer)
  resid_post biases at blocks.*.hook_resid_post
  ln2        biases at blocks.*.ln2.hook_normalized (MLP input)
  single     one vector at blocks.12.hook_resid_post
  lora       LoRA r=8, alpha=8 on q,k,v,o,gate,up,down (baseline)
and report, on held-out rows, CE of base / teacher / fitted with
gap closed = (base - fitted) / (base - teacher), and the top-k KL to the teacher with
KL gap closed = 1 - KL_fitted / KL_base.

Usage: python bench/bench_gap.py [--rows 1200] [--epochs 3] [--only qkv,lora] [--out runs/gap]
Results are appended to OUT/results.jsonl; each fit's curves are in OUT/NAME/metrics.jsonl.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from steerdiff.fit import FitConfig, evaluate_vectors, fit
from steerdiff.generate import load_dataset
from steerdiff.io import append_jsonl
from steerdiff.models import load_model
from steerdiff.tasks.numbers import make_dataset
from steerdiff.teachers import build_teacher
from steerdiff.vectors import VectorSet

CONFIGS = {
    "qkv": dict(hooks=["blocks.*.attn.hook_{q,k,v}"], lr=1e-2),
    "resid_post": dict(hooks=["blocks.*.hook_resid_post"], lr=1e-2),
    "ln2": dict(hooks=["blocks.*.ln2.hook_normalized"], lr=1e-3),  # diverged at 1e-2
    "single": dict(hooks=["blocks.12.hook_resid_post"], lr=2e-2),
}


def make_data(lm, path: Path, n_rows: int, seed: int, max_new_tokens: int) -> None:
    """The owl-prompted teacher writes number lists through the library's own path
    (tasks.numbers.make_dataset: constrained decoding + format grammar, top-20 log-probs)."""
    teacher = build_teacher({"kind": "prompt", "animal": "owl"}, lm)
    manifest = make_dataset(
        teacher,
        str(path),
        n_prompts=2 * n_rows,
        target_valid=n_rows,
        topk=20,
        max_new_tokens=max_new_tokens,
        seed=seed,
    )
    print(
        f"  {manifest['n_valid']} valid rows; rejects {manifest.get('rejects')}; "
        f"{manifest.get('tokens_per_second')} tok/s",
        flush=True,
    )


def owl_shares(lm, out: Path, names: list[str], system_prompt: str) -> None:
    """Does the fit steer the preference? Owl share of base, teacher and each fitted model."""
    from steerdiff.evals.preference import Steering, exact_preference, paired_difference
    from steerdiff.fit import LoraConfig, lora_context

    runs = {"base": {}, "teacher (owl system prompt)": {"system_prompt": system_prompt}}
    for name in names:
        if name == "lora":
            from safetensors.torch import load_file

            state = load_file(out / name / "adapter.safetensors")
            runs[name] = {"context": lora_context(lm, LoraConfig(r=8, alpha=8), state)}
        else:
            vs = VectorSet.load(out / name / "vectors.safetensors", lm)
            runs[name] = {"steering": Steering(vs)}
    base = None
    for label, kw in runs.items():
        ctx = kw.pop("context", None)
        if ctx is not None:
            with ctx:
                r = exact_preference(lm, "owl", n_questions=50)
        else:
            r = exact_preference(lm, "owl", n_questions=50, **kw)
        row = {
            "name": label,
            "owl_share": r.target_rate,
            "ci95": list(r.ci95),
            "top_other": r.off_target(),
            "n_questions": r.n_questions,
        }
        base = base or r
        diff, ci = paired_difference(r, base)
        row["minus_base"], row["minus_base_ci95"] = diff, list(ci)
        print(json.dumps(row), flush=True)
        append_jsonl(out / "traits.jsonl", [row])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=1200)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--objective", default="distill")
    ap.add_argument("--only", default="qkv,resid_post,ln2,single,lora")
    ap.add_argument("--out", default="runs/bench_gap")
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--eval-every", type=int, default=30)
    ap.add_argument("--schedule", default="cosine")
    ap.add_argument("--lora-lr", type=float, default=2e-3)
    ap.add_argument("--lr", type=float, default=None)
    ap.add_argument(
        "--traits",
        default="",
        help="names of finished fits in OUT: owl share (exact scorer, 50 questions, 95%% CI) "
        "of base, prompted teacher and each fit's model, no training",
    )
    ap.add_argument(
        "--evaluate",
        default="",
        help="names of finished vector fits in OUT to re-evaluate (with intervals), no training",
    )
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    lm = load_model()
    data = out / "owl_numbers.jsonl"
    if not data.exists():
        print(f"making dataset {data} ...", flush=True)
        make_data(lm, data, args.rows, args.seed, args.max_new_tokens)
    rows, manifest = load_dataset(data)
    print(f"dataset: {len(rows)} rows, teacher {manifest['teacher']['kind']}", flush=True)
    base = dict(
        objective=args.objective,
        optimizer="adam",
        epochs=args.epochs,
        batch_size=args.batch_size,
        val_size=max(32, len(rows) // 5),
        schedule="cosine",
        warmup_steps=2,
        eval_every=args.eval_every,
        lr_units="absolute",  # the lrs here are absolute (the default is activation units)
        converge_tol=None,  # a fixed epoch budget (the default stops on convergence)
        seed=args.seed,
    )
    results = out / "results.jsonl"
    if args.traits:
        owl_shares(lm, out, args.traits.split(","), manifest["teacher"]["system_prompt"])
    for name in filter(None, args.evaluate.split(",")):
        cfg = FitConfig(**{**base, **CONFIGS[name]})
        vs = VectorSet.load(out / name / "vectors.safetensors", lm)
        row = {"name": name, "re_evaluated": True, **evaluate_vectors(lm, data, vs, cfg)}
        print(json.dumps(row), flush=True)
        append_jsonl(results, [row])
    for name in filter(None, args.only.split(",")):
        t0 = time.time()
        if name == "lora":
            from steerdiff.fit import LoraConfig, fit_lora

            cfg = FitConfig(**{**base, "lr": args.lora_lr, "schedule": args.schedule})
            res = fit_lora(lm, data, cfg, LoraConfig(r=8, alpha=8), out_dir=out / name)
            n_params = res.extra.get("n_trainable")
        else:
            spec = CONFIGS[name]
            cfg = FitConfig(
                **{
                    **base,
                    "schedule": args.schedule,
                    **spec,
                    **({"lr": args.lr} if args.lr else {}),
                }
            )
            res = fit(lm, data, cfg, out_dir=out / name)
            n_params = sum(v.numel() for v in res.vectors.values())
        row = {
            "name": name,
            "n_params": n_params,
            **res.summary(),
            "seconds": round(time.time() - t0),
        }
        row.pop("n_trainable", None)
        print(json.dumps(row), flush=True)
        append_jsonl(results, [row])


if __name__ == "__main__":
    main()
