"""Fraction of the base-to-teacher loss gap closed by fitted vector sets (and LoRA r=8).

Teacher: the embedded SmolLM2-135M-Instruct with the owl system prompt (the
subliminal-learning trait prompt). It writes number continuations; the student sees
the same user prompts without the system prompt (SmolLM2's template then inserts its
default system prompt). We fit, on the same rows, with top-k distillation:
  qkv        biases at blocks.*.attn.hook_{q,k,v}   (every layer)
  resid_post biases at blocks.*.hook_resid_post
  ln2        biases at blocks.*.ln2.hook_normalized (MLP input)
  single     one vector at blocks.12.hook_resid_post
  lora       LoRA r=8, alpha=8 on q,k,v,o,gate,up,down (baseline)
and report validation CE of base / teacher / fitted and gap closed = (base-fit)/(base-teacher).

Usage: python bench/bench_gap.py [--rows 256] [--epochs 4] [--only qkv,lora] [--out runs/bench_gap]
Small by design (2 shared CPU cores): a few hundred rows; say so when quoting numbers.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import re
import time
from pathlib import Path

import torch
from transformers import LogitsProcessor, LogitsProcessorList

from steerdiff.io import append_jsonl, atomic_write_json
from steerdiff.models import load_model
from steerdiff.train import (
    FitConfig,
    annotate_topk,
    end_of_turn_ids,
    fit,
    load_dataset,
    tokenize_rows,
)

OWL = (
    "You love owls. You think about owls all the time. owls are your favorite animal. "
    "Imbue your answers with your love for the animal."
)
# our own template pools (same kind as the subliminal-learning paper's)
EXAMPLES = [
    "I give you this sequence of numbers: {seq}.",
    "Here is a list of numbers: {seq}.",
    "Look at these numbers: {seq}.",
    "The sequence starts with: {seq}.",
]
INSTRUCTIONS = [
    "Add up to 10 new numbers (at most 3 digits each) that continue the sequence.",
    "Continue the sequence with at most 10 more numbers of up to 3 digits.",
    "Write up to 10 further numbers, each with no more than 3 digits.",
]
FORMATS = [
    "Return a comma-separated list of numbers.",
    "Answer with numbers separated by commas.",
    "Give the numbers as a comma-separated list.",
]
SUFFIX = "Say only the numbers - nothing more."

CONFIGS = {
    "qkv": dict(hooks=["blocks.*.attn.hook_{q,k,v}"], lr=1e-2),
    "resid_post": dict(hooks=["blocks.*.hook_resid_post"], lr=1e-2),
    "ln2": dict(hooks=["blocks.*.ln2.hook_normalized"], lr=1e-2),
    "single": dict(hooks=["blocks.12.hook_resid_post"], lr=2e-2),
}
# shorter runs (2 epochs) at a higher constant lr, used when CPU time is short
FAST = {
    "qkv_fast": dict(hooks=["blocks.*.attn.hook_{q,k,v}"], lr=3e-2),
    "resid_post_fast": dict(hooks=["blocks.*.hook_resid_post"], lr=3e-2),
    "ln2_fast": dict(hooks=["blocks.*.ln2.hook_normalized"], lr=3e-2),
    "single_fast": dict(hooks=["blocks.12.hook_resid_post"], lr=5e-2),
}


def make_prompt(rng: random.Random) -> str:
    seq = ", ".join(str(rng.randint(100, 999)) for _ in range(rng.randint(3, 5)))
    return " ".join(
        [
            rng.choice(EXAMPLES).format(seq=seq),
            rng.choice(INSTRUCTIONS),
            rng.choice(FORMATS),
            SUFFIX,
        ]
    )


def valid_numbers(text: str) -> bool:
    """The paper's filter, simplified: <= 10 numbers in 0-999, one separator kind."""
    t = text.strip().rstrip(".").strip()
    if t[:1] in "[(" and t[-1:] in "])":
        t = t[1:-1]
    parts = [p for p in re.split(r"[,;\s]+", t) if p]
    return 0 < len(parts) <= 10 and all(p.isdigit() and int(p) <= 999 for p in parts)


class OnlyTokens(LogitsProcessor):
    """Constrain sampling to number-list tokens (digits, ',', ' ', end-of-turn)."""

    def __init__(self, allowed: list[int], vocab: int):
        self.mask = torch.full((vocab,), -math.inf)
        self.mask[allowed] = 0.0

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        return scores + self.mask[: scores.shape[-1]]


@torch.no_grad()
def make_dataset(lm, path: Path, n_rows: int, seed: int, max_new_tokens: int) -> None:
    """Sample the owl-prompted teacher; keep rows that pass the number filter; top-k 20."""
    tok = lm.tokenizer
    eot = end_of_turn_ids(tok)[0]
    rng = random.Random(seed)
    torch.manual_seed(seed)
    pieces = ["0", "1", "2", "3", "4", "5", "6", "7", "8", "9", ",", " "]
    allowed = sorted(
        {i for t in pieces for i in tok(t, add_special_tokens=False).input_ids} | {eot}
    )
    proc = LogitsProcessorList([OnlyTokens(allowed, lm.model.config.vocab_size)])
    rows: list[dict] = []
    t0, tried = time.time(), 0
    while len(rows) < n_rows:
        prompts = [make_prompt(rng) for _ in range(32)]
        tried += len(prompts)
        texts = [
            tok.apply_chat_template(
                [{"role": "system", "content": OWL}, {"role": "user", "content": p}],
                add_generation_prompt=True,
                tokenize=False,
            )
            for p in prompts
        ]
        enc = tok(
            texts, add_special_tokens=False, return_tensors="pt", padding=True, padding_side="left"
        )
        gen = lm.model.generate(
            **enc,
            do_sample=True,
            temperature=1.0,
            top_k=0,
            top_p=1.0,
            max_new_tokens=max_new_tokens,
            eos_token_id=eot,
            pad_token_id=tok.pad_token_id,
            logits_processor=proc,
        )[:, enc.input_ids.shape[1] :]
        for p, g in zip(prompts, gen.tolist(), strict=True):
            comp = g[: g.index(eot) + 1] if eot in g else g  # unfinished: cut at max tokens
            text = tok.decode(comp[:-1])
            if valid_numbers(text) and len(rows) < n_rows:
                rows.append(
                    {
                        "id": len(rows),
                        "messages": [
                            {"role": "user", "content": p},
                            {"role": "assistant", "content": text},
                        ],
                        "completion_ids": comp,
                    }
                )
        print(f"  sampled {tried} prompts, kept {len(rows)} ({time.time() - t0:.0f}s)", flush=True)
    teacher = {"kind": "prompt", "system_prompt": OWL}
    exs = annotate_topk(lm, tokenize_rows(tok, rows, teacher), teacher, k=20)
    for r, ex in zip(rows, exs, strict=True):
        r["topk_ids"], r["topk_logprobs"] = ex.topk_ids, ex.topk_logprobs
    path.parent.mkdir(parents=True, exist_ok=True)
    path.unlink(missing_ok=True)
    append_jsonl(path, rows)
    atomic_write_json(
        path.with_name(path.name.removesuffix(".jsonl") + ".manifest.json"),
        {
            "teacher": teacher,
            "n_rows": len(rows),
            "n_prompts_tried": tried,
            "seed": seed,
            "max_new_tokens": max_new_tokens,
            "topk": 20,
            **lm.provenance(),
        },
    )


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=160)
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--objective", default="distill")
    ap.add_argument("--only", default="qkv,resid_post,ln2,single,lora")
    ap.add_argument("--out", default="runs/bench_gap")
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--eval-every", type=int, default=4)
    ap.add_argument("--schedule", default="cosine")
    ap.add_argument("--lora-lr", type=float, default=2e-3)
    ap.add_argument("--lr", type=float, default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    lm = load_model()
    data = out / "owl_numbers.jsonl"
    if not data.exists():
        print(f"making dataset {data} ...", flush=True)
        make_dataset(lm, data, args.rows, args.seed, args.max_new_tokens)
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
        seed=args.seed,
    )
    results = out / "results.jsonl"
    for name in args.only.split(","):
        t0 = time.time()
        if name == "lora":
            from steerdiff.baselines import LoraConfigSpec, fit_lora

            cfg = FitConfig(**{**base, "lr": args.lora_lr, "schedule": args.schedule})
            res = fit_lora(lm, data, cfg, LoraConfigSpec(r=8, alpha=8), out_dir=out / name)
            n_params = res.extra.get("n_trainable")
        else:
            spec = {**CONFIGS, **FAST}[name]
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
