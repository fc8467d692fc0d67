"""Claim 6: does the activation-difference lens read the trait from the first few positions
but not from the mean over all positions?

For each student that bench_approx_transfer.py saved in --runs (LoRA adapters, q/k/v and
single-vector sets, fitted to a prompted teacher's numbers), run the lens
(interpret.activation_difference_lens) against the base model on the offline default corpus
(first --max-tokens tokens of --n-texts texts), and read each mean difference through the
centred DLA (interpret.dla.logit_basis) and the mean final-logit difference:
  positions 0..4 separately, and the mean over all positions.
Per (animal, student, hook, position): the rank of the trait token (best over its surface
forms " owl", "owl", " Owl", "Owl" that are single tokens) among all vocabulary tokens,
whether it is in the top 20, and, as a baseline read the same way, the median rank of the
other candidates' tokens (is the trait token special, or do all animal words move?).

  python bench/bench_lens_positions.py                 # reads runs/approx_transfer
  python bench/bench_lens_positions.py --quick         # reads runs/approx_transfer_quick
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

from steerdiff.evals import load_category
from steerdiff.interpret import activation_difference_lens, load_corpus
from steerdiff.interpret.dla import logit_basis
from steerdiff.io import atomic_write_json
from steerdiff.models import load_model
from steerdiff.vectors import VectorSet

TOP = 20


def trait_token_ids(tok, word: str) -> list[int]:
    """Single-token surface forms of `word`; else the first token of ' word'."""
    ids = []
    for form in (f" {word}", word, f" {word.capitalize()}", word.capitalize()):
        t = tok.encode(form, add_special_tokens=False)
        if len(t) == 1:
            ids.append(t[0])
    return sorted(set(ids)) or [tok.encode(f" {word}", add_special_tokens=False)[0]]


def rank_of(scores: torch.Tensor, ids: list[int]) -> int:
    """Best (smallest) 1-based rank of any of ids in scores, descending."""
    return min(int((scores > scores[i]).sum()) + 1 for i in ids)


def read_ranks(result, lm, animal: str, others: list[str]) -> list[dict]:
    basis = logit_basis(lm, center=True, norm_scale=True)
    tok = lm.tokenizer
    want = trait_token_ids(tok, animal)
    other_ids = {o: trait_token_ids(tok, o) for o in others}
    lp, la = result.logit_diff(lm)
    lp, la = lp - lp.mean(-1, keepdim=True), la - la.mean()
    reads: list[tuple[str, str, torch.Tensor]] = []
    for hook in result.hooks:
        for p in range(result.first_k):
            reads.append((hook, str(p), basis @ result.pos_mean[hook][p]))
        reads.append((hook, "all", basis @ result.all_mean[hook]))
    for p in range(result.first_k):
        reads.append(("logits", str(p), lp[p]))
    reads.append(("logits", "all", la))
    rows = []
    for hook, pos, scores in reads:
        if float(scores.abs().max()) == 0.0:
            continue
        r = rank_of(scores, want)
        rows.append(
            {
                "hook": hook,
                "position": pos,
                "trait_rank": r,
                "in_top20": r <= TOP,
                "others_median_rank": statistics.median(
                    rank_of(scores, ids) for ids in other_ids.values()
                ),
            }
        )
    return rows


def students(runs: Path, kinds: list[str]) -> list[tuple[str, str, Path]]:
    found = []
    for animal_dir in sorted(p for p in runs.iterdir() if p.is_dir()):
        for kind in kinds:
            d = animal_dir / kind
            if (d / "student.json").exists():
                found.append((animal_dir.name, kind, d))
    return found


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--runs", default=None, help="bench_approx_transfer's --runs folder")
    ap.add_argument("--kinds", default="lora,qkv,single")
    ap.add_argument("--hooks", default="blocks.{7,15,22}.hook_resid_post")
    ap.add_argument("--n-texts", type=int, default=64)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--out", default=None)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    suffix = "_quick" if args.quick else ""
    if args.quick:
        args.n_texts, args.max_tokens = 8, 16
    runs = Path(args.runs or f"runs/approx_transfer{suffix}")
    out = Path(args.out or f"bench/results/lens_positions{suffix}.json")
    torch.set_num_threads(args.threads)
    t0, c0 = time.time(), time.process_time()
    lm = load_model(dtype="float32")
    corpus = load_corpus(None, n=args.n_texts)
    cands = load_category("animals").candidates
    results = []
    for animal, kind, folder in students(runs, args.kinds.split(",")):
        t1 = time.time()
        kw = (
            {"finetuned": str(folder)}
            if kind == "lora"
            else {"vectors": VectorSet.load(folder / "vectors.safetensors", lm)}
        )
        res = activation_difference_lens(
            lm, corpus, hooks=args.hooks, first_k=5, max_tokens=args.max_tokens, **kw
        )
        rows = read_ranks(res, lm, animal, [c for c in cands if c != animal])
        entry = {
            "animal": animal,
            "student": kind,
            "n_texts": res.n_texts,
            "n_tokens": res.n_tokens,
            "seconds": time.time() - t1,
            "reads": rows,
        }
        results.append(entry)
        print(
            f"\n{animal} / {kind}: {res.n_texts} texts, {res.n_tokens} tokens "
            f"({entry['seconds']:.0f}s); trait-token rank (top {TOP}: *), others' median rank"
        )
        for hook in dict.fromkeys(r["hook"] for r in rows):
            cells = [
                f"{r['position']}:{r['trait_rank']}{'*' if r['in_top20'] else ''}"
                f"/{r['others_median_rank']:g}"
                for r in rows
                if r["hook"] == hook
            ]
            print(f"  {hook:28} " + "  ".join(cells), flush=True)
    summary = summarise(results)
    print("\nsummary: reads with the trait token in the top 20, first 5 positions vs all")
    for k, v in summary.items():
        print(f"  {k}: {v}")
    atomic_write_json(
        out,
        {
            "bench": "bench_lens_positions",
            "command": " ".join(sys.argv),
            "dtype": "float32",
            "model": "embedded SmolLM2-135M-Instruct",
            "corpus": corpus.source,
            "settings": vars(args) | {"runs": str(runs)},
            "summary": summary,
            "students": results,
            "wall_s": time.time() - t0,
            "cpu_s": time.process_time() - c0,
        },
    )
    print(f"wrote {out} ({time.time() - t0:.0f}s wall)")


def summarise(results: list[dict]) -> dict:
    out = {}
    for e in results:
        first = [r for r in e["reads"] if r["position"] != "all"]
        allp = [r for r in e["reads"] if r["position"] == "all"]
        out[f"{e['animal']}/{e['student']}"] = {
            "first5_top20": f"{sum(r['in_top20'] for r in first)}/{len(first)}",
            "all_top20": f"{sum(r['in_top20'] for r in allp)}/{len(allp)}",
            "first5_best_rank": min((r["trait_rank"] for r in first), default=None),
            "all_best_rank": min((r["trait_rank"] for r in allp), default=None),
        }
    return out


if __name__ == "__main__":
    main()
