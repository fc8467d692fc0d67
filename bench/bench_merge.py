"""Merged checkpoints (steerdiff.merge): how close to `steer`, how long to export, how fast.

1. Tiny random model of each family, every hook kind the family can merge (one vector each,
   coeff 1.5): max |logit difference| between the exported folder (reloaded with plain
   transformers) and the hooked model, next to the size of the steering effect itself.
2. The embedded SmolLM2-135M with q/k/v vectors at every layer and one residual vector,
   in float32 and in bfloat16: export time next to a plain save_pretrained of the same model
   (the baseline, same run); max |logit diff| merged vs hooked; mean KL per token of the
   hooked and the merged model to the float32 hooked one (bfloat16 rounding is amplified by
   steering at 91 hooks, so both are compared to float32); forward-pass time of the merged
   model vs the hooked one (best of N rounds).

    python bench/bench_merge.py [--rounds 5] [--threads 1]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM

from steerdiff.hooks import HOOK_SUFFIXES, hook_dim, steer
from steerdiff.merge import MergeError, export_merged, merge_vectors
from steerdiff.models import load_model

TINY = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=256,
    max_position_embeddings=128,
)
FAMILIES = {
    "llama": TINY,
    "qwen2": TINY,
    "qwen3": {**TINY, "head_dim": 16},
    "gemma2": {**TINY, "head_dim": 16},
    "gemma3_text": {**TINY, "head_dim": 16, "sliding_window": 4},
    "gpt2": dict(n_embd=64, n_layer=3, n_head=4, vocab_size=256, n_positions=128),
}


def vec(model, name: str, seed: int, scale: float = 1.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return scale * torch.randn(hook_dim(model, name), generator=g)


@torch.no_grad()
def logits(model, ids, vectors=None, coeff=1.0) -> torch.Tensor:
    if vectors is None:
        return model(ids).logits.float()
    with steer(model, vectors, coeff=coeff):
        return model(ids).logits.float()


def tiny_families(ids: torch.Tensor) -> None:
    print("family       hooks merged  refused  max|merged-steer|  max|steer-base|")
    for family, kw in FAMILIES.items():
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(AutoConfig.for_model(family, **kw)).eval()
        vectors, refused = {}, 0
        for i, s in enumerate(HOOK_SUFFIXES):
            for layer in (0, 1):
                name = f"blocks.{layer}.{s}"
                v = {name: vec(model, name, 10 * i + layer, 0.5)}
                try:
                    merge_vectors(model, v)
                    vectors.update(v)
                except MergeError:
                    refused += 1
        with tempfile.TemporaryDirectory() as tmp:
            export_merged(model, vectors, Path(tmp) / "m", coeff=1.5)
            merged = AutoModelForCausalLM.from_pretrained(Path(tmp) / "m", dtype=torch.float32)
        want = logits(model, ids, vectors, 1.5)
        diff = (logits(merged.eval(), ids) - want).abs().max().item()
        effect = (want - logits(model, ids)).abs().max().item()
        print(f"{family:12s} {len(vectors):12d} {refused:8d} {diff:18.2e} {effect:16.3f}")


def best_of(rounds: int, fn) -> float:
    times = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def seconds(fn, *args, **kw) -> float:
    t0 = time.perf_counter()
    fn(*args, **kw)
    return time.perf_counter() - t0


def kl(p_logits: torch.Tensor, q_logits: torch.Tensor) -> float:
    """Mean KL(p || q) per token, in nats."""
    lp, lq = p_logits.log_softmax(-1), q_logits.log_softmax(-1)
    return (lp.exp() * (lp - lq)).sum(-1).mean().item()


def embedded(dtype: str, rounds: int, ids: torch.Tensor, ref: dict | None) -> dict:
    """Export, compare, time; `ref`: the float32 run's logits (None: this is that run)."""
    lm = load_model("default", dtype=dtype)
    hf = lm.model
    names = [f"blocks.{layer}.attn.hook_{x}" for layer in range(30) for x in "qkv"]
    names.append("blocks.14.hook_resid_post")
    vectors = {n: vec(hf, n, i, 0.1) for i, n in enumerate(names)}
    t_save, t_export = [], []  # interleaved: the disk and page cache swing from write to write
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(3):
            t_save.append(seconds(hf.save_pretrained, Path(tmp) / f"plain{r}"))
            t_export.append(seconds(export_merged, lm, vectors, Path(tmp) / f"m{r}", coeff=2.0))
        out = export_merged(lm, vectors, Path(tmp) / "m", coeff=2.0)
        merged = AutoModelForCausalLM.from_pretrained(out, dtype=hf.dtype).eval()
    base, hooked, got = logits(hf, ids), logits(hf, ids, vectors, 2.0), logits(merged, ids)
    ref = ref or {"base": base, "hooked": hooked}
    print(
        f"{dtype:9s} export {' / '.join(f'{t:.2f}' for t in t_export)} s, plain save_pretrained "
        f"{' / '.join(f'{t:.2f}' for t in t_save)} s (interleaved);\n{'':9s} "
        f"max|merged-hooked| {(got - hooked).abs().max().item():.2e} logits, steering moves "
        f"them by up to {(hooked - base).abs().max().item():.2f}"
    )
    print(
        f"{'':9s} KL to float32 hooked, nats/token: hooked {kl(ref['hooked'], hooked):.2e}, "
        f"merged {kl(ref['hooked'], got):.2e} (base vs float32 base: {kl(ref['base'], base):.2e};"
        f" steered vs base: {kl(hooked, base):.2f})"
    )
    with torch.no_grad():
        t_base = best_of(rounds, lambda: hf(ids))
        t_merged = best_of(rounds, lambda: merged(ids))
        with steer(hf, vectors, coeff=2.0):
            t_hooked = best_of(rounds, lambda: hf(ids))
    print(
        f"{'':9s} forward [{ids.shape[0]} x {ids.shape[1]}]: base {t_base * 1e3:6.1f} ms, "
        f"hooked (91 hooks) {t_hooked * 1e3:6.1f} ms, merged {t_merged * 1e3:6.1f} ms "
        f"(best of {rounds})"
    )
    return ref


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    ids = torch.randint(1, 256, (2, 12), generator=torch.Generator().manual_seed(0))
    print("== tiny models, float32, every mergeable hook kind at layers 0 and 1 (coeff 1.5)")
    tiny_families(ids)
    print("== embedded SmolLM2-135M: q/k/v at all 30 layers + blocks.14.hook_resid_post")
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1, 49152, (8, 64), generator=g)
    ref = embedded("float32", args.rounds, ids, None)
    embedded("bfloat16", args.rounds, ids, ref)


if __name__ == "__main__":
    main()
