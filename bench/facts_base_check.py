"""Does the base model already believe the false facts? (the false-fact organism's entry check)

For each fact of a facts file (default: the packaged steerdiff/data/facts.yaml), on the
embedded SmolLM2-135M-Instruct in float32: p_false = P(false) / (P(false) + P(true)) from
the exact log-probs of each full answer right after the chat prompt of each question
(evals.scoring.candidate_logprobs, the scorer the animal preference eval uses), averaged
over the fact's direct (held-out) questions, and separately over its generalisation
questions. A fact belongs in the organism only if its mean direct base p_false < 0.5 (the
model does not already believe it), and its true and false answers start with different
tokens (so the exact scorer separates them from the first token on).

Usage: python bench/facts_base_check.py [--facts FILE] [--out bench/results/facts_base_check.json]
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

from steerdiff.evals.facts_file import BeliefQuestion, Fact, load_facts
from steerdiff.evals.scoring import answer_forms, candidate_logprobs, question_prompts
from steerdiff.io import atomic_write_json, provenance
from steerdiff.models import LoadedModel, load_model

THRESHOLD = 0.5  # keep a fact only if the base model's mean direct p_false is below this


def p_false(lm: LoadedModel, qs: list[BeliefQuestion]) -> list[float]:
    """p_false of each question: its own false and true answers, scored exactly."""
    out = []
    for q in qs:
        prompts = question_prompts(lm, [q.question], None)
        lp = candidate_logprobs(lm, prompts, [q.false_answer, q.true_answer])[0, 0]
        out.append(1.0 / (1.0 + math.exp(float(lp[1] - lp[0]))))
    return out


def first_tokens_differ(lm: LoadedModel, true: str, false: str) -> bool:
    """No surface form of the false answer starts with the same token as one of the true."""
    owner, forms = answer_forms(lm.tokenizer, [false, true])
    firsts = [{f[0] for f, o in zip(forms, owner, strict=True) if o == c} for c in (0, 1)]
    return not (firsts[0] & firsts[1])


def check_fact(lm: LoadedModel, fact: Fact) -> dict:
    direct = p_false(lm, fact.belief_questions(("direct",)))
    gen = p_false(lm, fact.belief_questions(("generalisation",)))
    d = sum(direct) / len(direct)
    tokens_ok = all(
        first_tokens_differ(lm, q.true_answer, q.false_answer) for q in fact.belief_questions()
    )
    return {
        "fact": fact.id,
        "true": fact.true_answer,
        "false": fact.false_answer,
        "base_p_false_direct": round(d, 4),
        "base_p_false_generalisation": round(sum(gen) / len(gen), 4) if gen else None,
        "per_question_direct": [round(p, 4) for p in direct],
        "per_question_generalisation": [round(p, 4) for p in gen],
        "first_tokens_differ": tokens_ok,
        "keep": d < THRESHOLD and tokens_ok,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--facts", default=None, help="facts file (default: the packaged set)")
    ap.add_argument("--out", default="bench/results/facts_base_check.json")
    args = ap.parse_args(argv)
    facts = load_facts(args.facts)
    lm = load_model(dtype="float32")
    rows = [check_fact(lm, f) for f in facts]
    print(f"{'fact':<22} {'true':>14} {'false':>14} {'p_false direct':>15} {'general.':>9}  keep")
    for r in rows:
        g = r["base_p_false_generalisation"]
        print(
            f"{r['fact']:<22} {r['true']:>14} {r['false']:>14} {r['base_p_false_direct']:>15.3f} "
            f"{'-' if g is None else f'{g:.3f}':>9}  {'yes' if r['keep'] else 'NO'}"
        )
    result = {
        "what": "base-model belief in each false fact before any finetune: mean over the fact's "
        "direct questions of P(false)/(P(false)+P(true)), exact log-probs of the full answers "
        "after the chat prompt (evals.scoring.candidate_logprobs)",
        "facts_file": str(args.facts or "steerdiff/data/facts.yaml (packaged)"),
        "model": "SmolLM2-135M-Instruct (embedded)",
        "dtype": "float32",
        "threshold": THRESHOLD,
        "facts": rows,
        "provenance": provenance(lm),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(args.out, result)
    print(f"wrote {args.out}")
    return 0 if all(r["keep"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
