"""The TopK SAE trainer: one SAE's parameters, its Adam state and one training step.

The recipe, written from the published descriptions (no code copied):

- TopK activation, k latents per token (Gao et al. 2024, "Scaling and evaluating sparse
  autoencoders", arXiv:2406.04093; EleutherAI sparsify, sparsify/sparse_coder.py):
  z = topk(relu((x - b_dec) W_enc + b_enc)), x_hat = z W_dec + b_dec.
- Loss: the fraction of variance unexplained, |x - x_hat|^2 / |x - mean(x)|^2 over the batch,
  plus auxk_alpha (1/32) x the AuxK loss: the k_aux = d_in / 2 largest pre-activations of the
  dead latents (not fired for `dead_tokens` tokens) must reconstruct the residual x - x_hat
  (without b_dec), scaled by min(n_dead / k_aux, 1) (sparsify/trainer.py, the paper's
  appendix A.2).
- Decoder rows kept at unit norm after every step, and the part of their gradient parallel
  to them removed before it (sparsify: set_decoder_norm_to_unit_norm,
  remove_gradient_parallel_to_decoder_directions).
- Initialisation: W_enc uniform in +-1/sqrt(d_in) (a torch Linear's default), W_dec its
  transpose with unit rows, b_enc 0, b_dec the mean of the first activations
  (sparsify sets b_dec from the first batch).
- Adam with lr 2e-4 / sqrt(d_sae / 2^14) unless given (sparsify's default scaling).

The trainer works on normalised activations (x times the hook's scale, see sae_train);
`to_sae(scale)` folds the scale back in, so the saved SAE reads raw activations.
"""

from __future__ import annotations

import math

import torch

from ..sae import SAE


def _decode(idx: torch.Tensor, vals: torch.Tensor, w_dec: torch.Tensor) -> torch.Tensor:
    """sum_j vals[:, j] * w_dec[idx[:, j]], [batch, d_in]: as a dense matmul of the scattered
    latents, which on a CPU is several times faster than a sparse gather (embedding_bag),
    forward and backward."""
    z = torch.zeros(idx.shape[0], w_dec.shape[0], dtype=vals.dtype).scatter(-1, idx, vals)
    return z @ w_dec


def auto_lr(d_sae: int) -> float:
    """sparsify's default learning rate for d_sae latents."""
    return 2e-4 / math.sqrt(d_sae / 2**14)


class TopKTrainer:
    """One TopK SAE in training (weights in SAELens' orientation)."""

    def __init__(
        self,
        d_in: int,
        d_sae: int,
        k: int,
        lr: float,
        seed: int,
        b_dec: torch.Tensor | None = None,
        auxk_alpha: float = 1 / 32,
        dead_tokens: int = 10_000_000,
    ) -> None:
        gen = torch.Generator().manual_seed(seed)
        bound = 1 / math.sqrt(d_in)
        w_enc = (torch.rand(d_in, d_sae, generator=gen) * 2 - 1) * bound  # [d_in, d_sae]
        w_dec = w_enc.T.clone()
        w_dec /= w_dec.norm(dim=1, keepdim=True)  # [d_sae, d_in], unit rows
        self.W_enc = torch.nn.Parameter(w_enc)
        self.b_enc = torch.nn.Parameter(torch.zeros(d_sae))
        self.W_dec = torch.nn.Parameter(w_dec)
        self.b_dec = torch.nn.Parameter(
            torch.zeros(d_in) if b_dec is None else b_dec.detach().float().clone()
        )
        self.k, self.k_aux = k, max(1, d_in // 2)
        self.auxk_alpha, self.dead_tokens = auxk_alpha, dead_tokens
        self.opt = torch.optim.Adam(self.params(), lr=lr)
        self.since_fired = torch.zeros(d_sae, dtype=torch.long)  # tokens since each last fired

    def params(self) -> list[torch.nn.Parameter]:
        return [self.W_enc, self.b_enc, self.W_dec, self.b_dec]

    def dead_fraction(self) -> float:
        """Latents that have not fired in the last `dead_tokens` training tokens."""
        return float((self.since_fired >= self.dead_tokens).float().mean())

    def step(self, x: torch.Tensor) -> dict[str, float]:
        """One Adam step on a batch x [batch, d_in] (normalised); returns fvu, mse, l0, dead."""
        dead = self.since_fired >= self.dead_tokens  # [d_sae], before this batch
        # (x - b_dec) W_enc + b_enc, with b_dec's term a vector-matrix product: x needs no
        # gradient, so the backward pass runs one batch-sized matmul (W_enc's), not two
        pre = x @ self.W_enc + (self.b_enc - self.b_dec @ self.W_enc)  # [batch, d_sae]
        vals, idx = pre.topk(self.k, dim=-1)  # [batch, k]
        vals = torch.relu(vals)
        x_hat = _decode(idx, vals, self.W_dec) + self.b_dec
        err = x - x_hat  # [batch, d_in]
        total_var = (x - x.mean(0)).pow(2).sum()
        sse = err.pow(2).sum()
        loss = sse / total_var
        n_dead = int(dead.sum())
        if n_dead:
            k_aux = min(self.k_aux, n_dead)
            a_vals, a_idx = pre.masked_fill(~dead, float("-inf")).topk(k_aux, dim=-1)
            e_hat = _decode(a_idx, torch.relu(a_vals), self.W_dec)
            auxk = (e_hat - err.detach()).pow(2).sum() / total_var
            loss = loss + self.auxk_alpha * min(n_dead / self.k_aux, 1.0) * auxk
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        with torch.no_grad():
            g, w = self.W_dec.grad, self.W_dec
            g -= (g * w).sum(dim=1, keepdim=True) * w  # no change along the (unit) rows
        self.opt.step()
        with torch.no_grad():
            self.W_dec /= self.W_dec.norm(dim=1, keepdim=True).clamp_min(1e-12)
            fired = torch.zeros_like(dead)
            fired[idx[vals > 0]] = True
            self.since_fired += x.shape[0]
            self.since_fired[fired] = 0
        return {
            "fvu": float(sse.detach() / total_var),
            "mse": float(sse.detach()) / x.numel(),
            "l0": float((vals > 0).sum()) / x.shape[0],
            "dead": self.dead_fraction(),
        }

    def state_dict(self) -> dict:
        return {
            "W_enc": self.W_enc.detach().clone(),
            "b_enc": self.b_enc.detach().clone(),
            "W_dec": self.W_dec.detach().clone(),
            "b_dec": self.b_dec.detach().clone(),
            "opt": self.opt.state_dict(),
            "since_fired": self.since_fired.clone(),
        }

    def load_state_dict(self, state: dict) -> None:
        with torch.no_grad():
            for name in ("W_enc", "b_enc", "W_dec", "b_dec"):
                getattr(self, name).copy_(state[name])
        self.opt.load_state_dict(state["opt"])
        self.since_fired = state["since_fired"].clone()

    def to_sae(self, scale: float, hook: str) -> SAE:
        """The SAE on RAW activations x, trained on x * scale: with pre(x) computed as
        (x - b_dec/scale) (scale W_enc) + b_enc = (scale x - b_dec) W_enc + b_enc, the latents
        are the same, and decoding with W_dec/scale, b_dec/scale gives x_hat(scale x) / scale."""
        return fold_scale(
            SAE(
                W_enc=self.W_enc.detach().clone(),
                b_enc=self.b_enc.detach().clone(),
                W_dec=self.W_dec.detach().clone(),
                b_dec=self.b_dec.detach().clone(),
                activation="topk",
                k=self.k,
                hook=hook,
                apply_b_dec_to_input=True,
            ),
            scale,
        )


def fold_scale(sae: SAE, scale: float) -> SAE:
    """An SAE trained on x * scale, rewritten to read raw x (and reconstruct raw x):
    W_enc * scale, W_dec / scale, b_dec / scale; b_enc (and a threshold) unchanged. (With
    or without b_dec subtracted before encoding: (x - b_dec/s)(s W_enc) = (s x - b_dec) W_enc.)"""
    return SAE(
        W_enc=sae.W_enc * scale,
        b_enc=sae.b_enc.clone(),
        W_dec=sae.W_dec / scale,
        b_dec=sae.b_dec / scale,
        activation=sae.activation,
        hook=sae.hook,
        threshold=sae.threshold,
        k=sae.k,
        apply_b_dec_to_input=sae.apply_b_dec_to_input,
        source=dict(sae.source),
    )
