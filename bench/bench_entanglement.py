"""Token entanglement (claim 7, Zur et al. 2025) on the embedded SmolLM2, per animal.

For each animal: the numbers whose probability (as the first number of the answer to a
number prompt) the trait system prompt raises most (mean log-ratio over prompts, 95% CI),
and subliminal prompting: the exact-scorer trait share with the top-K entangled numbers in
the system prompt vs random numbers of the same lengths (2 sets) vs no system prompt, with
differences paired by question (95% CI over the 50 questions). With --teacher-data (a
pattern with {animal}) and --base-data, also the frequency shift of the top numbers in
the teacher's dataset vs the base's.

    python bench/bench_entanglement.py [--quick] [--prompts 24] [--top 5]
        [--teacher-data 'runs/data/{animal}.jsonl' --base-data runs/data/base.jsonl]
        [--out bench/results/entanglement.json]
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch

from steerdiff.evals import exact_preference
from steerdiff.interpret.entanglement import frequency_shift, number_logprobs, token_entanglement
from steerdiff.interpret.plots import entanglement_bars_png
from steerdiff.interpret.subliminal import EntanglementReport, subliminal_prompting
from steerdiff.io import atomic_write_json, provenance
from steerdiff.models import load_model
from steerdiff.tasks.numbers import make_prompts
from steerdiff.teachers import build_teacher

ANIMALS = ["owl", "cat", "dog", "eagle", "lion", "dolphin", "wolf", "elephant"]


def _ci(ci: tuple[float, float], scale: float = 100.0) -> str:
    return f"[{scale * ci[0]:.2f}, {scale * ci[1]:.2f}]"


def _spearman(x: list[float], y: list[float]) -> float:
    rx = torch.tensor(x).argsort().argsort().double()
    ry = torch.tensor(y).argsort().argsort().double()
    return float(torch.corrcoef(torch.stack([rx, ry]))[0, 1])


def specific_numbers(results: dict[str, dict], k: int) -> dict:
    """Trait-specific entanglement: each animal's mean log-ratio minus the mean of the other
    animals' (the base cancels: log P_animal - mean log P_other animals), top k; and the
    overlap of the animals' top-k lists vs base (shared numbers = a generic effect of any
    "You love Xs" system prompt, not of the trait)."""
    lr = {a: torch.tensor(r["entanglement"]["all_log_ratios"]) for a, r in results.items()}
    out: dict = {"top": {}, "mean_jaccard_top_vs_base": None}
    if len(lr) < 2:
        return out
    for a, v in lr.items():
        others = torch.stack([w for b, w in lr.items() if b != a]).mean(0)
        spec = v - others
        p_t = torch.tensor(results[a]["entanglement"]["all_p_teacher"])
        spec[p_t < results[a]["entanglement"]["min_prob"]] = -torch.inf  # as rank_entangled
        idx = spec.argsort(descending=True)[:k].tolist()
        out["top"][a] = [(str(i), round(float(spec[i]), 3)) for i in idx]
    tops = {
        a: set(r["entanglement"]["top"][i]["number"] for i in range(k)) for a, r in results.items()
    }
    names = list(tops)
    jac = [
        len(tops[a] & tops[b]) / len(tops[a] | tops[b])
        for i, a in enumerate(names)
        for b in names[i + 1 :]
    ]
    out["mean_jaccard_top_vs_base"] = sum(jac) / len(jac)
    return out


def print_animal(animal: str, d: dict, n_prompts: int) -> None:
    """The figures of one animal (from its EntanglementReport dict), as the page shows them."""
    ent, sub, freq = d["entanglement"], d["subliminal"], d["frequencies"]
    top = ", ".join(
        f"{e['number']} ({e['log_ratio']:+.2f} {_ci(e['ci95'], 1)})" for e in ent["top"]
    )
    e, r = sub["entangled_minus_none"], sub["entangled_minus_random"]
    print(f"\n{animal}: top numbers (mean log-ratio, 95% CI, n={n_prompts} prompts): {top}")
    print(
        f"  share % (n={sub['n_questions']} questions): entangled "
        f"{100 * sub['entangled']['target_rate']:.2f} {_ci(sub['entangled']['ci95'])}; random "
        f"{100 * sub['random_rate']:.2f} {_ci(sub['random_ci95'])}; none "
        f"{100 * sub['none']['target_rate']:.2f} {_ci(sub['none']['ci95'])}"
    )
    print(
        f"  entangled - none {100 * e[0]:+.2f} {_ci(e[1])}; entangled - random "
        f"{100 * r[0]:+.2f} {_ci(r[1])} (points, paired by question)"
    )
    if freq:
        print(
            f"  dataset share of the top {len(ent['top'])}: teacher "
            f"{100 * freq['set_teacher_rate']:.3f}% vs base {100 * freq['set_base_rate']:.3f}% "
            f"(diff {_ci(freq['set_difference_ci95'])}, {freq['teacher_numbers']}/"
            f"{freq['base_numbers']} numbers)"
        )
    else:
        print("  dataset frequency shift: not measured (no --teacher-data / --base-data)")
    print(f"  {d['meta']['seconds']} s", flush=True)


def summarize(summary: dict, out: Path) -> None:
    """Across animals: how many beat random numbers, the rank correlation of entanglement
    strength with the subliminal lift, the overlap of the top lists, trait-specific numbers."""
    results, k = summary["animals"], summary["sizes"]["top"]
    strength = [sum(e["log_ratio"] for e in results[a]["entanglement"]["top"]) / k for a in results]
    lift = [results[a]["subliminal"]["entangled_minus_random"][0] for a in results]
    lifted = [a for a in results if results[a]["subliminal"]["entangled_minus_random"][1][0] > 0]
    rho = _spearman(strength, lift) if len(results) > 2 else float("nan")
    summary["entanglement_vs_lift_spearman"] = rho
    summary["specific"] = specific_numbers(results, k)
    summary["animals_lifted_over_random"] = lifted
    atomic_write_json(out, summary)
    print(
        f"\nanimals whose entangled-number prompt beats random numbers (CI > 0): "
        f"{len(lifted)}/{len(results)} {lifted}; Spearman(top-{k} mean log-ratio, "
        f"entangled - random) over {len(results)} animals: {rho:.2f}"
    )
    spec = summary["specific"]
    print(
        f"mean Jaccard overlap of the animals' top-{k} lists (vs base): "
        f"{spec['mean_jaccard_top_vs_base']}"
    )
    for a, top in spec["top"].items():
        print(f"  {a} trait-specific (vs the other animals' prompts): {top}")
    print(
        f"wall {summary['wall_s']} s, CPU {summary['cpu_s']} s (float32, 2-core CPU shared); "
        f"wrote {out}"
    )


def add_frequencies(summary: dict, teacher_data: str | None, base_data: str | None) -> None:
    """The frequency shift of each animal's top numbers where its teacher dataset exists."""
    if not (teacher_data and base_data):
        return
    for animal, d in summary["animals"].items():
        tpath = teacher_data.format(animal=animal)
        if os.path.exists(tpath) and not d.get("frequencies"):
            nums = [e["number"] for e in d["entanglement"]["top"]]
            d["frequencies"] = frequency_shift(nums, tpath, base_data).to_dict()


def merge(paths: list[str], out: Path, teacher_data: str | None, base_data: str | None) -> None:
    """Join runs on different animals (same sizes) into one result and summary (and add
    frequency shifts where datasets are given: counting only, no model)."""
    parts = [json.loads(Path(p).read_text()) for p in paths]
    if any(p["sizes"] != parts[0]["sizes"] for p in parts):
        raise SystemExit(f"error: the runs have different sizes: {[p['sizes'] for p in parts]}")
    summary = {**parts[0], "animals": {}, "merged_from": paths}
    summary["wall_s"] = round(sum(p["wall_s"] for p in parts), 1)
    summary["cpu_s"] = round(sum(p["cpu_s"] for p in parts), 1)
    summary["wall_note"] = "wall_s and cpu_s are sums over the joined runs (they may overlap)"
    for p in parts:
        summary["animals"].update(p["animals"])
    add_frequencies(summary, teacher_data, base_data)
    for a, d in summary["animals"].items():
        print_animal(a, d, summary["sizes"]["prompts"])
    summarize(summary, out)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="2 animals, 4 prompts, 5 questions")
    ap.add_argument("--animals", default=",".join(ANIMALS))
    ap.add_argument("--prompts", type=int, default=24, help="number prompts per condition")
    ap.add_argument("--top", type=int, default=5, help="entangled numbers reported and prompted")
    ap.add_argument("--questions", type=int, default=None, help="default: all 50")
    ap.add_argument("--controls", type=int, default=2, help="random number sets")
    ap.add_argument("--teacher-data", default=None, help="dataset path with {animal}")
    ap.add_argument("--base-data", default=None)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--merge", nargs="+", default=None, help="join result JSONs of runs (no model)")
    ap.add_argument("--out", default="bench/results/entanglement.json")
    args = ap.parse_args()
    out = Path(args.out)
    if args.merge:
        merge(args.merge, out, args.teacher_data, args.base_data)
        return
    if args.threads:
        torch.set_num_threads(args.threads)
    animals = [a.strip() for a in args.animals.split(",") if a.strip()]
    n_prompts, n_q = args.prompts, args.questions
    if args.quick:
        animals, n_prompts, n_q = animals[:2], 4, 5
    t0, c0 = time.perf_counter(), time.process_time()
    lm = load_model(dtype="float32")
    users = make_prompts(n_prompts)
    print(
        f"model {lm.spec} float32; {len(animals)} animals; {n_prompts} number prompts; "
        f"top {args.top}; questions {n_q or 50}; {args.controls} random sets; "
        f"torch threads {torch.get_num_threads()}",
        flush=True,
    )
    base_lp = number_logprobs(build_teacher({"kind": "plain"}, lm), users, "base numbers")

    def score(animal: str):
        return lambda sp: exact_preference(lm, animal, n_questions=n_q, system_prompt=sp)

    sizes = {"prompts": n_prompts, "questions": n_q or 50, "top": args.top}
    summary = {"sizes": {**sizes, "controls": args.controls}, "dtype": "float32"}
    summary.update(provenance=provenance(lm), animals={})
    for animal in animals:
        ta = time.perf_counter()
        ent = token_entanglement(lm, animal, users, top=args.top, base_lp=base_lp)
        nums = ent.numbers()
        sub = subliminal_prompting(animal, nums, score(animal), n_controls=args.controls)
        freq = None
        if args.teacher_data and args.base_data:
            tpath = args.teacher_data.format(animal=animal)
            if os.path.exists(tpath):
                freq = frequency_shift(nums, tpath, args.base_data)
        rep = EntanglementReport(ent, freq, sub, {"seconds": round(time.perf_counter() - ta, 1)})
        summary["animals"][animal] = rep.to_dict()
        entanglement_bars_png(ent, out.with_name(f"{out.stem}_{animal}.png"))
        print_animal(animal, summary["animals"][animal], n_prompts)
        summary["wall_s"] = round(time.perf_counter() - t0, 1)
        summary["cpu_s"] = round(time.process_time() - c0, 1)
        atomic_write_json(out, summary)  # after every animal: a cut-off run keeps its figures
    summarize(summary, out)


if __name__ == "__main__":
    main()
