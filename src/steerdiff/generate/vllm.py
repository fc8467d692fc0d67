"""Optional vLLM backend for teacher datasets on GPUs (`--backend vllm`, extra `vllm`).

Supported: "prompt", "plain" and "steered" teachers, temperature / top-p / seed,
constrained decoding (vLLM's `allowed_token_ids`), top-k log-probs (vLLM's `logprobs=k`).

vLLM runs its own kernels, so our PyTorch hooks never fire inside it. A steered teacher
(vectors at positions "all") therefore runs as a merged checkpoint: the base model with
the vectors baked into its biases (steerdiff.merge), exported once into the steerdiff cache
(keyed by weights hash, vector hash, coeff and dtype) and loaded by `vllm.LLM`. A GGUF
model (such as the embedded SmolLM2) runs as its cached Hugging Face export the same way.
`VllmSampler.for_model(lm, vectors)` samples a fitted vector student likewise.
`engine_model` says which folder vLLM loads; everything up to `vllm.LLM(...)` runs
without a GPU.

Not supported yet (use the default `hf` backend): steering at positions other than "all",
hooks no bias can express (see steerdiff.merge), adapter teachers (vLLM's LoRARequest is
not wired up). Not tested in CI: this machine has no GPU.

Differences from the hf backend: vLLM's top-k log-probs may be computed after its
own logits processing depending on the vLLM version (`logprobs_mode`); ours are the
raw model distribution. Per-prompt seeds make rows reproducible for a given vLLM
version, but they do not match the hf backend's samples.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch

from ..errors import SteerdiffError
from ..merge import merged_model_folder
from ..models import LoadedModel
from .sampler import Sample, SampleStats

SUPPORTED_KINDS = ("prompt", "plain", "steered")


class VllmUnavailable(SteerdiffError, RuntimeError):
    """vLLM is not installed or cannot run this request."""


def _import_vllm() -> Any:
    try:
        import vllm
    except ImportError as e:
        raise VllmUnavailable(
            "The vLLM backend needs vLLM and a CUDA GPU: `pip install 'steerdiff[vllm]'`. "
            "Without a GPU use the default backend (`--backend hf`)."
        ) from e
    return vllm


def _loadable_as_is(source: str) -> bool:
    """A Hugging Face folder or hub id (not a GGUF file, not a model built in memory)."""
    path = Path(source)
    if path.is_dir():
        return (path / "config.json").is_file()
    return source != "in-memory" and path.suffix != ".gguf" and not path.exists()


def engine_model(
    lm: LoadedModel,
    vectors: Mapping[str, torch.Tensor] | None = None,
    coeff: float = 1.0,
    positions: str = "all",
) -> str:
    """What vLLM loads for `lm` steered by `coeff * vectors`: the model's own folder or hub
    id when there is nothing to merge, else the cached merged checkpoint (exported on first
    use; merge.MergeError, one line, for vectors no bias can express)."""
    if not vectors and _loadable_as_is(str(lm.source)):
        return str(lm.source)
    return str(merged_model_folder(lm, vectors, coeff, positions))


class VllmSampler:
    """Holds one vLLM engine for a teacher's model; `sample` mirrors generate.sample."""

    def __init__(self, teacher: Any, **engine_kwargs: Any) -> None:
        if teacher.kind not in SUPPORTED_KINDS:
            raise VllmUnavailable(
                f"The vLLM backend does not support {teacher.kind!r} teachers yet "
                f"(only {', '.join(SUPPORTED_KINDS)}); use --backend hf."
            )
        vllm = _import_vllm()  # before any export: no vLLM, no work
        self._vllm = vllm
        steered = teacher.kind == "steered"
        self.model_path = engine_model(
            teacher.lm,
            teacher.vectors if steered else None,
            teacher.coeff if steered else 1.0,
            teacher.positions if steered else "all",
        )
        self.llm = vllm.LLM(model=self.model_path, **engine_kwargs)

    @classmethod
    def for_model(
        cls,
        lm: LoadedModel,
        vectors: Mapping[str, torch.Tensor] | None = None,
        coeff: float = 1.0,
        **engine_kwargs: Any,
    ) -> VllmSampler:
        """A sampler for `lm` plus `coeff * vectors` at all positions, e.g. a fitted vector
        student (a student is a steered model, so it runs as a merged checkpoint)."""
        kind = "steered" if vectors else "plain"
        model = SimpleNamespace(kind=kind, lm=lm, vectors=vectors, coeff=coeff, positions="all")
        return cls(model, **engine_kwargs)

    def sample(
        self,
        prompts: Sequence[Sequence[int]],
        max_new_tokens: int = 64,
        temperature: float = 1.0,
        top_p: float = 1.0,
        seed: int = 0,
        stop_ids: Sequence[int] = (),
        allowed_ids: Sequence[int] | None = None,
        topk: int = 0,
        stats: SampleStats | None = None,
        grammar: Any = None,
        **_: Any,
    ) -> list[Sample]:
        if grammar is not None:
            raise VllmUnavailable(
                "The vLLM backend has no per-row format grammar; use --no-grammar "
                "(token-set constraint only) or --backend hf."
            )
        stop = list(stop_ids)
        params = [
            self._vllm.SamplingParams(
                n=1,
                temperature=temperature,
                top_p=top_p,
                max_tokens=max_new_tokens,
                seed=seed + i,
                stop_token_ids=stop,
                allowed_token_ids=sorted(set(allowed_ids) | set(stop)) if allowed_ids else None,
                logprobs=topk or None,
                skip_special_tokens=False,
            )
            for i in range(len(prompts))
        ]
        t0 = time.perf_counter()
        outs = self.llm.generate(
            [{"prompt_token_ids": list(p)} for p in prompts], params, use_tqdm=False
        )
        samples = []
        for i, o in enumerate(outs):
            c = o.outputs[0]
            ids = list(c.token_ids)
            stopped = c.finish_reason == "stop"
            if stopped and (not ids or ids[-1] not in stop) and isinstance(c.stop_reason, int):
                ids.append(c.stop_reason)
            tk_ids, tk_lp = [], []
            for step in (c.logprobs or [])[: len(ids)] if topk else []:
                best = sorted(step.items(), key=lambda kv: -kv[1].logprob)[:topk]
                tk_ids.append([int(t) for t, _ in best])
                tk_lp.append([round(float(lp.logprob), 5) for _, lp in best])
            samples.append(Sample(i, ids, stopped, tk_ids, tk_lp))
        if stats is not None:
            stats.seconds += time.perf_counter() - t0
            stats.new_tokens += sum(len(s.token_ids) for s in samples)
            stats.prompt_tokens += sum(len(p) for p in prompts)
        return samples
