"""FLOP counts of a decoder-only LM's forward and backward passes, for throughput benches.

Import from a bench script (`bench/` is on sys.path when a script in it runs):

    from _flops import ModelShape, teacher_forced_flops, sampler_flops, fit_step_flops
    shape = ModelShape.of(lm.model)
    gflops = teacher_forced_flops(shape, batch=32, seq=114) / 1e9

What is counted (one multiply-add = 2 FLOPs; norms, activations, rotary, softmax are left out:
they are O(d_model) per token, under 1% of the matmuls):

* matmuls: 2 x (matmul weights of one decoder block) x (tokens run) per block, i.e.
  2 x (non-embedding parameters used per token) x tokens; biases and norm weights are not
  matmul weights and are left out;
* the unembedding (lm_head): 2 x d_model x vocab per position whose logits are computed:
  every position in a teacher-forced HF forward, only the last position per row in the
  sampler's prefill and one per row per decode step, only the loss (completion) tokens in a
  fit step;
* attention scores and values: 2 matmuls (Q K^T and P V) of 2 x d_attn FLOPs per
  (query, key) pair and layer, d_attn = n_heads x head_dim; a causal sequence of s tokens
  has s(s+1)/2 pairs (about half of s^2), a decode step at cache length t has t pairs per row.
  Sliding windows (gemma) are not modelled. This is the useful work: a masked kernel that
  computes the full s x s square (HF passes an explicit mask for padded batches) runs up
  to twice this term, which is ~3% of the total at 100 tokens for SmolLM2-135M;
* backward with frozen weights (steering-vector fits): no weight gradients, only input
  gradients: 2 x (block matmul weights) x tokens per block the gradient passes through
  (so forward + backward is ~2x the forward, not the 3x of training the weights), the
  lm_head's input gradient on the loss tokens, and 2.5x the forward attention term
  (dV, dP, dQ, dK, plus the recomputed scores of a flash-style kernel, as
  torch.utils.flop_counter counts it). Blocks below the first trainable hook do not run
  at all when the fit's prefix cache holds their output; the block of a resid_post vector
  runs forward only; the block of a q/k/v vector is backpropagated down to its q/k/v
  outputs but not through the q/k/v projections.

`counted_flops(fn)` runs fn under torch.utils.flop_counter.FlopCounterMode (with a formula
for the CPU flash-attention kernel, which torch does not count: full square unless the
kernel is told is_causal, then half) as an independent check of the counts above.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode, flop_registry, register_flop_formula

from steerdiff.hooks import get_blocks


@dataclass(frozen=True)
class ModelShape:
    """What the FLOP counts need to know about a model."""

    n_layers: int
    block_params: int  # matmul weights (2-D parameters) of one decoder block
    qkv_params: int  # of which the q/k/v projections
    head_params: int  # lm_head weight: d_model x vocab
    d_attn: int  # n_heads x head_dim: width of Q K^T and P V
    d_kv: int  # kv_heads x head_dim: width of K (and of V) in the KV cache

    @classmethod
    def of(cls, model: nn.Module) -> ModelShape:
        """Read the shape of a HF causal LM (llama/qwen/gemma-style; gpt2's names too)."""
        blocks = get_blocks(model)
        per_block = [sum(p.numel() for p in b.parameters() if p.dim() == 2) for b in blocks]
        if len(set(per_block)) != 1:
            raise ValueError(f"blocks differ in size ({sorted(set(per_block))}); not modelled")
        cfg = model.config
        d = getattr(cfg, "hidden_size", None) or cfg.n_embd
        heads = getattr(cfg, "num_attention_heads", None) or cfg.n_head
        kv_heads = getattr(cfg, "num_key_value_heads", None) or heads
        head_dim = getattr(cfg, "head_dim", None) or d // heads
        head = model.get_output_embeddings()
        return cls(
            n_layers=len(blocks),
            block_params=per_block[0],
            qkv_params=d * (heads + 2 * kv_heads) * head_dim,
            head_params=head.weight.numel(),
            d_attn=heads * head_dim,
            d_kv=kv_heads * head_dim,
        )


def block_flops(shape: ModelShape, tokens: int, pairs: int, n_blocks: int) -> int:
    """Forward of n_blocks decoder blocks over `tokens` tokens with `pairs` attended
    (query, key) pairs per block."""
    return n_blocks * (2 * shape.block_params * tokens + 4 * shape.d_attn * pairs)


def causal_pairs(batch: int, seq: int) -> int:
    """(query, key) pairs of `batch` causal sequences of `seq` tokens."""
    return batch * seq * (seq + 1) // 2


def head_flops(shape: ModelShape, rows: int) -> int:
    """The unembedding of `rows` positions."""
    return 2 * shape.head_params * rows


def teacher_forced_flops(shape: ModelShape, batch: int, seq: int) -> int:
    """A HF forward of [batch, seq] tokens (logits at every position)."""
    tokens = batch * seq
    return block_flops(shape, tokens, causal_pairs(batch, seq), shape.n_layers) + head_flops(
        shape, tokens
    )


def prefill_flops(shape: ModelShape, batch: int, prompt_len: int) -> int:
    """The sampler's prefill: [batch, prompt_len] (left-padded) and the last position's logits."""
    pairs = causal_pairs(batch, prompt_len)
    return block_flops(shape, batch * prompt_len, pairs, shape.n_layers) + head_flops(shape, batch)


def decode_flops(shape: ModelShape, batch: int, prompt_len: int, new_tokens: int) -> int:
    """The decode steps after the prefill for `new_tokens` generated tokens per row: the first
    token comes from the prefill's logits, so new_tokens - 1 steps of one token per row, the
    step feeding token i attending to prompt_len + i positions."""
    total = 0
    for i in range(1, new_tokens):
        total += block_flops(shape, batch, batch * (prompt_len + i), shape.n_layers)
        total += head_flops(shape, batch)
    return total


def sampler_flops(shape: ModelShape, batch: int, prompt_len: int, new_tokens: int) -> int:
    """Prefill + decode of one batch with no early stop (every row gets new_tokens)."""
    return prefill_flops(shape, batch, prompt_len) + decode_flops(
        shape, batch, prompt_len, new_tokens
    )


def fit_step_flops(
    shape: ModelShape,
    batch: int,
    seq: int,
    loss_tokens: int,
    start: int,
    start_grad: Literal["none", "attention"],
) -> int:
    """One fit step (forward + backward, weights frozen) replaying blocks start.. from the
    prefix cache over [batch, seq] tokens with `loss_tokens` completion tokens.

    start_grad: how far the gradient goes into block `start`: "none" (the vectors are at its
    resid_post or later) or "attention" (q/k/v vectors at block start: its MLP, o_proj and
    attention are backpropagated, its q/k/v projections are not).
    """
    tokens, pairs = batch * seq, causal_pairs(batch, seq)
    n_fwd = shape.n_layers - start
    fwd = block_flops(shape, tokens, pairs, n_fwd) + head_flops(shape, loss_tokens)
    attn_bwd = 10 * shape.d_attn * pairs  # 2.5x the forward's 4 * d_attn * pairs
    bwd_block = 2 * shape.block_params * tokens + attn_bwd
    bwd = (n_fwd - 1) * bwd_block + head_flops(shape, loss_tokens)
    if start_grad == "attention":
        bwd += 2 * (shape.block_params - shape.qkv_params) * tokens + attn_bwd
    return fwd + bwd


def fit_epoch_flops(
    shape: ModelShape,
    batches: list[tuple[int, int, int]],
    start: int,
    start_grad: Literal["none", "attention"],
) -> int:
    """Sum of fit_step_flops over (batch, seq, loss_tokens) of each step of an epoch."""
    return sum(fit_step_flops(shape, b, s, n, start, start_grad) for b, s, n in batches)


def prefix_flops(shape: ModelShape, batch: int, seq: int, start: int) -> int:
    """The fit's prefix cache: blocks 0..start-1 once per batch (no grad, no logits)."""
    return block_flops(shape, batch * seq, causal_pairs(batch, seq), start)


# ----------------------------------------------------------------------------- the check

_CPU_SDPA = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
_CPU_SDPA_BWD = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward


def _pairs_factor(is_causal: bool, s_q: int, s_k: int) -> float:
    """Fraction of the s_q x s_k square a kernel computes: about half when is_causal."""
    return (s_q * (s_q + 1) / 2) / (s_q * s_k) if is_causal and s_q == s_k else 1.0


def _sdpa_fwd(
    q: Any,
    k: Any,
    v: Any,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    *a: Any,
    out_shape: Any = None,
    **kw: Any,
) -> int:
    b, h, s_q, d = q
    return int(4 * b * h * s_q * k[2] * d * _pairs_factor(is_causal, s_q, k[2]))


def _sdpa_bwd(
    g: Any,
    q: Any,
    k: Any,
    v: Any,
    out: Any,
    lse: Any,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    *a: Any,
    out_shape: Any = None,
    **kw: Any,
) -> int:
    b, h, s_q, d = q
    return int(10 * b * h * s_q * k[2] * d * _pairs_factor(is_causal, s_q, k[2]))


def _register_cpu_sdpa() -> None:
    """Teach FlopCounterMode the CPU flash-attention kernels (torch 2.13 counts them as 0)."""
    if _CPU_SDPA not in flop_registry:
        register_flop_formula(_CPU_SDPA)(_sdpa_fwd)
    if _CPU_SDPA_BWD not in flop_registry:
        register_flop_formula(_CPU_SDPA_BWD)(_sdpa_bwd)


def counted_flops(fn: Callable[[], Any]) -> tuple[int, dict[str, int]]:
    """Run fn() under FlopCounterMode: (total FLOPs, FLOPs per aten op)."""
    _register_cpu_sdpa()
    with FlopCounterMode(display=False) as fc:
        fn()
    per_op = {str(k): int(v) for k, v in fc.get_flop_counts().get("Global", {}).items()}
    return int(fc.get_total_flops()), per_op
