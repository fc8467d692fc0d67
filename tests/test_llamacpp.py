"""llama.cpp itself runs the GGUF control vectors steerdiff exports, with the effect of `steer`.

`VectorSet.to_gguf_control_vector` writes `direction.{l}` tensors; llama.cpp adds
`direction.{l}` to the output of its layer l (`build_cvec` after the FFN residual, i.e.
`blocks.{l}.hook_resid_post`). These tests load the embedded GGUF models in llama.cpp
(llama-cpp-python), apply an exported control vector exactly as llama.cpp's own loader
(`common_control_vector_load` in common/common.cpp) does, and compare the change of
llama.cpp's logits with the change of steerdiff's logits under `steer` on the same
(dequantised) weights and the same token ids.

Tolerance, from the quantisation noise. llama.cpp computes with the quantised weights (and
8-bit activations in its matmuls); steerdiff with the dequantised float32 weights (loaded
with dtype="float32": bfloat16 would add its own rounding to the noise). The
unsteered logits of the two therefore differ by `noise` = ||logits_llama - logits_hf||
(Frobenius over positions x vocab; 3.7% of the logits' norm on SmolLM2 Q4_1, 6.2% on
Gemma 3 Q4_K). The steered difference d = steered - unsteered carries the same kind of
error, so a correct export gives ||d_llama - d_hf|| of about one `noise` (measured: 1.0 to
1.25 over 3 seeds x 3 strengths, both models); we allow 1.5. The same vector at the
neighbouring layer gives 3 to 30 x `noise` (SmolLM2, strength 0.5 of the residual norm) or
5 to 8 x (Gemma, 0.25; its neighbours are closer at larger strengths); we require 2.5 x.
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch

from steerdiff.hooks import record, steer
from steerdiff.models import LoadedModel, embedded_gemma3_path, embedded_smollm2_path, load_model
from steerdiff.vectors import VectorSet

llama_cpp = pytest.importorskip(
    "llama_cpp",
    reason="llama-cpp-python is not installed (install.sh builds it, or "
    "`pip install llama-cpp-python`); the llama.cpp control-vector check is skipped",
)

pytestmark = pytest.mark.slow

TEXT = "The quick brown fox jumps over the lazy dog. My favourite animal is"
NOISE_TOL = 1.5  # a correct export: ||d_llama - d_hf|| <= 1.5 x the unsteered difference
WRONG_LAYER_MIN = 2.5  # the neighbouring layer: >= 2.5 x that difference


def _set_cvec(ctx, data, length: int, n_embd: int, il_start: int, il_end: int) -> int:
    """llama.cpp's control-vector call (renamed llama_set_adapter_cvec in 2025)."""
    for name in (
        "llama_set_adapter_cvec",
        "llama_apply_adapter_cvec",
        "llama_control_vector_apply",
    ):
        fn = getattr(llama_cpp, name, None)
        if fn is not None:
            return fn(ctx, data, length, n_embd, il_start, il_end)
    pytest.fail("this llama-cpp-python has no control-vector function")


@dataclass
class LlamaCpp:
    """A llama.cpp context on one GGUF model: logits of a token sequence, with or without a
    control vector."""

    llm: object
    n_embd: int
    n_layer: int

    @classmethod
    def open(cls, path: Path) -> LlamaCpp:
        llm = llama_cpp.Llama(
            model_path=str(path),
            n_ctx=64,
            n_batch=64,
            n_threads=1,
            n_threads_batch=1,
            logits_all=True,
            verbose=False,
        )
        m = llm.model
        return cls(llm, llama_cpp.llama_model_n_embd(m), llama_cpp.llama_model_n_layer(m))

    def logits(self, ids: list[int]) -> np.ndarray:
        """[pos, vocab] logits of a fresh evaluation (the KV cache is emptied first)."""
        self.llm.reset()
        self.llm.eval(ids)
        return np.array(self.llm.scores[: len(ids)], dtype=np.float64)

    def load_control_vector(self, path: Path) -> np.ndarray:
        """The buffer llama.cpp's `common_control_vector_load` builds from a control-vector
        GGUF: `direction.{l}` (l >= 1, float32, 1-D) summed into rows l-1 of [n_layer-1, n_embd]."""
        reader = gguf.GGUFReader(str(path))
        buf = np.zeros((self.n_layer - 1, self.n_embd), dtype=np.float32)
        for t in reader.tensors:
            kind, layer = t.name.split(".")
            assert kind == "direction" and int(layer) >= 1, t.name
            assert t.tensor_type == gguf.GGMLQuantizationType.F32 and t.data.shape == (self.n_embd,)
            buf[int(layer) - 1] += t.data
        return buf

    def apply(self, buf: np.ndarray | None) -> None:
        """Set the control vector (over layers 1..n_layer, as llama.cpp's CLI does), or clear it."""
        ctx = self.llm.ctx
        if buf is None:
            rc = _set_cvec(ctx, None, 0, self.n_embd, -1, -1)
        else:
            buf = np.ascontiguousarray(buf, dtype=np.float32)
            ptr = buf.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
            rc = _set_cvec(ctx, ptr, buf.size, self.n_embd, 1, self.n_layer)
        assert rc == 0, f"llama.cpp refused the control vector (rc={rc})"

    def steered_logits(self, ids: list[int], path: Path) -> np.ndarray:
        self.apply(self.load_control_vector(path))
        try:
            return self.logits(ids)
        finally:
            self.apply(None)


# spec -> (GGUF path, strength as a fraction of the median residual norm, the least number
# of positions whose steered top token is decided beyond the noise: Gemma, steered by a
# random direction, ranks odd tokens with margins of 0.03-0.9 logits at every position, all
# within its noise, so its top tokens are not compared)
MODELS = {
    "default": (embedded_smollm2_path, 0.5, 4),
    "gemma3-270m": (embedded_gemma3_path, 0.25, 0),
}


@pytest.fixture(scope="module")
def smol_cpp() -> LlamaCpp:
    """llama.cpp on the embedded SmolLM2 GGUF (the file steerdiff's default model is read from)."""
    return LlamaCpp.open(embedded_smollm2_path())


@pytest.fixture(scope="module", params=list(MODELS))
def pair(request, smollm_f32, smol_cpp) -> tuple[LoadedModel, LlamaCpp, float, int]:
    """steerdiff's model (dequantised) and llama.cpp on the same GGUF file."""
    spec = request.param
    path_fn, strength, min_clear = MODELS[spec]
    if spec == "default":
        return smollm_f32, smol_cpp, strength, min_clear
    return load_model(spec, dtype="float32"), LlamaCpp.open(path_fn()), strength, min_clear


def hf_logits(lm: LoadedModel, ids: list[int], vectors: dict | None = None) -> np.ndarray:
    x = torch.tensor([ids])
    with torch.no_grad():
        if vectors is None:
            return lm.model(input_ids=x).logits[0].double().numpy()
        with steer(lm, vectors):
            return lm.model(input_ids=x).logits[0].double().numpy()


def random_vector(lm: LoadedModel, ids: list[int], layer: int, strength: float) -> torch.Tensor:
    """A seeded random direction with `strength` x the median residual norm at `layer`
    (positions after the first, whose massive activation would dominate the median)."""
    hook = f"blocks.{layer}.hook_resid_post"
    with torch.no_grad(), record(lm, hook) as rec:
        lm.model(input_ids=torch.tensor([ids]))
    norm = float(rec[hook][0, 1:].norm(dim=-1).median())
    v = torch.randn(lm.model.config.hidden_size, generator=torch.Generator().manual_seed(0))
    return strength * norm * v / v.norm()


def test_control_vector_acts_in_llama_cpp_as_steer_at_its_layer(pair, tmp_path):
    """Catches: an exported `direction.{l}` that llama.cpp adds at another layer than steerdiff
    steers (an off-by-one in the export's layer number: mutating `to_gguf_control_vector` to
    write `direction.{l+1}` makes the error 7x the noise and this test fails), a sign flip,
    or a control vector that llama.cpp does not apply at all."""
    lm, cpp, strength, min_clear = pair
    ids = lm.tokenizer(TEXT).input_ids
    layer = cpp.n_layer // 2
    v = random_vector(lm, ids, layer, strength)
    path = VectorSet.for_model(lm, {f"blocks.{layer}.hook_resid_post": v}).to_gguf_control_vector(
        tmp_path / "cv.gguf"
    )

    base_cpp, base_hf = cpp.logits(ids), hf_logits(lm, ids)
    noise = np.linalg.norm(base_cpp - base_hf)
    steered_cpp = cpp.steered_logits(ids, path)
    d_cpp = steered_cpp - base_cpp

    def err(steered_hf: np.ndarray) -> float:
        return float(np.linalg.norm(d_cpp - (steered_hf - base_hf)) / noise)

    steered_hf = {
        at: hf_logits(lm, ids, {f"blocks.{at}.hook_resid_post": v})
        for at in (layer - 1, layer, layer + 1)
    }
    effect = np.linalg.norm(steered_hf[layer] - base_hf) / noise
    assert effect > 5, f"the vector must change the logits well beyond the noise ({effect:.1f})"
    right, below, above = (err(steered_hf[at]) for at in (layer, layer - 1, layer + 1))
    assert right <= NOISE_TOL, f"llama.cpp's change differs from steer's by {right:.2f} x noise"
    assert below >= WRONG_LAYER_MIN and above >= WRONG_LAYER_MIN, (right, below, above)
    # the next token changes as with steer: wherever steer's top token leads its runner-up by
    # more than 6 sd of the unsteered logit difference at that position (the difference of two
    # logits' errors has sd sqrt(2) x that, so 6 sd is over 4 of its sds), llama.cpp agrees
    top2 = np.sort(steered_hf[layer], axis=1)[:, -2:]
    clear = (top2[:, 1] - top2[:, 0]) > 6 * (base_cpp - base_hf).std(axis=1)
    assert clear.sum() >= min_clear
    np.testing.assert_array_equal(steered_cpp.argmax(1)[clear], steered_hf[layer].argmax(1)[clear])
    assert (steered_cpp.argmax(1) != base_cpp.argmax(1)).any()


def test_resid_pre_and_several_layers_export_to_the_same_points(smollm_f32, smol_cpp, tmp_path):
    """Catches: `blocks.{l}.hook_resid_pre` exported to llama.cpp layer l (it is the output of
    layer l-1), or the vectors of a multi-layer set landing in the wrong rows of llama.cpp's
    buffer (mutation tried: no `- 1` for resid_pre in the export; the error goes from 1.1 to
    over 3 x noise)."""
    lm, cpp = smollm_f32, smol_cpp
    ids = lm.tokenizer(TEXT).input_ids
    vecs = {
        "blocks.8.hook_resid_post": random_vector(lm, ids, 8, 0.3),
        "blocks.21.hook_resid_pre": random_vector(lm, ids, 20, 0.3).roll(7),
    }
    path = VectorSet.for_model(lm, vecs).to_gguf_control_vector(tmp_path / "cv.gguf")
    assert sorted(t.name for t in gguf.GGUFReader(str(path)).tensors) == [
        "direction.20",
        "direction.8",
    ]
    base_cpp, base_hf = cpp.logits(ids), hf_logits(lm, ids)
    noise = np.linalg.norm(base_cpp - base_hf)
    d_cpp = cpp.steered_logits(ids, path) - base_cpp
    d_hf = hf_logits(lm, ids, vecs) - base_hf
    assert np.linalg.norm(d_hf) / noise > 5
    assert np.linalg.norm(d_cpp - d_hf) / noise <= NOISE_TOL
    shifted = {"blocks.8.hook_resid_post": vecs["blocks.8.hook_resid_post"]}
    shifted["blocks.21.hook_resid_post"] = vecs["blocks.21.hook_resid_pre"]  # one layer late
    d_late = hf_logits(lm, ids, shifted) - base_hf
    assert np.linalg.norm(d_cpp - d_late) / noise >= WRONG_LAYER_MIN


def test_zero_or_cleared_control_vector_leaves_llama_cpp_logits_unchanged(
    smollm, smol_cpp, tmp_path
):
    """Catches: an export or a load that puts something non-zero into llama.cpp for a zero
    vector, and a test harness whose 'unsteered' run still carries the last vector (the
    comparisons above would then compare steered with steered)."""
    cpp = smol_cpp
    ids = smollm.tokenizer(TEXT).input_ids
    zero = {"blocks.15.hook_resid_post": torch.zeros(cpp.n_embd)}
    path = VectorSet.for_model(smollm, zero).to_gguf_control_vector(tmp_path / "zero.gguf")
    base = cpp.logits(ids)
    np.testing.assert_array_equal(cpp.steered_logits(ids, path), base)
    big = {"blocks.15.hook_resid_post": torch.full((cpp.n_embd,), 5.0)}
    big_path = VectorSet.for_model(smollm, big).to_gguf_control_vector(tmp_path / "big.gguf")
    assert np.abs(cpp.steered_logits(ids, big_path) - base).max() > 1.0
    np.testing.assert_array_equal(cpp.logits(ids), base)  # cleared after steered_logits
