"""Acceptance bench: 1,000 valid constrained number rows from an owl-steered embedded teacher.

The steering vector is built here with hooks.record: the mean over number prompts of
the last-prompt-token residual (blocks.24.hook_resid_post) with the owl system prompt
minus without it, added with coeff 2 at every position while generating.

    python bench/bench_teacher_rows.py [--n-valid 1000] [--out /tmp/owl_rows.jsonl]

Prints the time, valid rate, reject reasons and tokens/s, and the machine load.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch

from steerdiff.chat import chat_prompt_ids
from steerdiff.hooks import record
from steerdiff.models import load_model
from steerdiff.tasks.numbers import make_dataset, make_prompts
from steerdiff.teachers import build_teacher, trait_system_prompt
from steerdiff.vectors import VectorSet

HOOK = "blocks.24.hook_resid_post"


def last_token_acts(lm, prompts_ids: list[list[int]]) -> torch.Tensor:
    """Residual at HOOK at each prompt's last token: [n, d_model]."""
    out = []
    with torch.inference_mode():
        for ids in prompts_ids:
            with record(lm.model, HOOK) as rec:
                lm.model(input_ids=torch.tensor([ids]))
            out.append(rec[HOOK][0, -1])
    return torch.stack(out)


def owl_vector(lm, n: int = 32) -> VectorSet:
    users = make_prompts(n, start=100_000)  # not the prompts the dataset uses
    sys = trait_system_prompt("owl")
    tok = lm.tokenizer
    pos = [
        chat_prompt_ids(tok, [{"role": "system", "content": sys}, {"role": "user", "content": u}])
        for u in users
    ]
    neg = [chat_prompt_ids(tok, [{"role": "user", "content": u}]) for u in users]
    v = (last_token_acts(lm, pos) - last_token_acts(lm, neg)).mean(0)  # [d_model]
    return VectorSet.for_model(
        lm, {HOOK: v}, method="last-token owl system prompt contrast", n_prompts=n
    )


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n-valid", type=int, default=1000)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--out", default="/tmp/steerdiff_bench/owl_rows.jsonl")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch default)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    load0 = os.getloadavg()
    t_all = time.perf_counter()
    lm = load_model()
    t0 = time.perf_counter()
    vs = owl_vector(lm)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    vpath = vs.save(out.with_suffix(".owl.safetensors"))
    t_vec = time.perf_counter() - t0
    teacher = build_teacher({"kind": "steered", "vectors": str(vpath), "coeff": 2.0}, lm)
    t1 = time.perf_counter()
    c1 = time.process_time()
    man = make_dataset(
        teacher,
        str(out),
        n_prompts=4 * args.n_valid,
        constrained=True,
        batch_size=args.batch_size,
        max_new_tokens=56,
        seed=0,
        target_valid=args.n_valid,
        probe=32,
        overwrite=True,
    )
    t_gen = time.perf_counter() - t1
    cpu_gen = time.process_time() - c1
    load1 = os.getloadavg()
    print(
        f"model load {lm.load_seconds:.1f}s; vector ({HOOK}, norm {vs[HOOK].norm():.2f}) {t_vec:.1f}s"
    )
    print(f"valid rows: {man['n_valid']} of {man['n_prompts']} prompts ({man['valid_rate']:.1%})")
    print(f"rejects: {json.dumps(man['rejects'])}")
    print(
        f"unconstrained valid rate (probe of {man['unconstrained_probe_n']}): {man['unconstrained_valid_rate']:.1%}"
    )
    print(
        f"generation {t_gen:.1f}s (incl. probe), {man['tokens_per_second']:.1f} new tokens/s, "
        f"{man['generated_tokens']} new + {man['prompt_tokens']} prompt tokens"
    )
    print(
        f"end to end incl. model load: {time.perf_counter() - t_all:.1f}s; "
        f"target: {args.n_valid} valid rows in < 600 s -> {'MET' if t_gen < 600 else 'NOT MET'}"
    )
    print(
        f"CPU time of the generation: {cpu_gen:.1f}s over {torch.get_num_threads()} threads "
        f"(~{cpu_gen / torch.get_num_threads():.0f}s wall if the cores were ours alone)"
    )
    print(f"load average at start {load0[0]:.1f}, at end {load1[0]:.1f} (2 cores shared)")
    print(f"torch threads {torch.get_num_threads()}; dataset {out}")


if __name__ == "__main__":
    main()
