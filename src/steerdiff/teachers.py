"""Teachers: the model + condition that writes a dataset.

A teacher is configured with a `TeacherConfig` (the experiment file's [teacher] table)
or with a small JSON-able spec dict (`Teacher.spec()`, what a dataset manifest records);
`build_teacher(config_or_spec, base_lm)` turns either into a Teacher, which both
generates (`sample`, `generating`) and scores (`scoring`, `completion_logprobs`), e.g.
when a fit scores validation data under the teacher. The five kinds as specs:

    {"kind": "prompt", "animal": "owl", "category": "animal", "system_prompt": "..."}
    {"kind": "steered", "vectors": "owl.safetensors", "coeff": 2.0, "positions": "all"}
    {"kind": "steered", "vectors": "owl.safetensors", "coeff": 8.0, "coeff_units": "whitened",
     "whiten": "b24.safetensors"}   # coeff in standard deviations of the data (steerdiff.whiten)
    {"kind": "sae", "sae": "saes/blocks.24", "latent": 123, "coeff": 8.0, "positions": "all"}
    {"kind": "adapter", "path": "runs/lora-owl"}   # PEFT LoRA folder or full model folder
    {"kind": "plain"}                               # the model itself (control data)

The teacher's system prompt is only used to generate (and to score): the rows written to a
dataset hold the user prompt and the answer, which is what a student sees.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import PreTrainedModel

from .adapters import AdapterError, check_adapter_base  # noqa: F401 (re-exported)
from .chat import chat_prompt_ids
from .extract import PERSONAS, TRAIT_TEMPLATE, trait_system_prompt  # noqa: F401 (re-exported)
from .generate import Sample, SampleStats, sample
from .generate.prefix import shared_prefix_hidden
from .hooks import parse_positions, steer
from .io import file_sha256
from .models import LoadedModel, ModelLoadError, weights_hash_of_files, wrap_model
from .replay import full_hidden, lm_head
from .sae import SAEError, load_sae
from .teacher_config import TeacherConfig, TeacherError, persona_prompt  # noqa: F401
from .vectors import VectorSet, VectorSetError
from .whiten import (
    Gaussian,
    WhitenError,
    place_gaussian,
    resolve_gaussians,
    whitened_coeff,
)

KINDS = ("prompt", "steered", "sae", "adapter", "plain")


@dataclass
class Teacher:
    """A model plus the condition under which it writes (and scores) completions.

    lm: the model that generates (the base model, or the adapted / finetuned one).
    system_prompt: used for kind "prompt" only; never written to datasets.
    vectors, coeff, positions: steering for kinds "steered" and "sae" (see hooks.steer).
    params: the rest of the spec (animal, paths, hashes), recorded in manifests.
    """

    kind: str
    lm: LoadedModel
    system_prompt: str | None = None
    vectors: VectorSet | None = None
    coeff: float = 1.0
    positions: str = "all"
    params: dict[str, Any] = field(default_factory=dict)
    chat_template_kwargs: dict[str, Any] = field(default_factory=dict)

    def spec(self) -> dict[str, Any]:
        """JSON-able description; `build_teacher(teacher.spec(), base_lm)` rebuilds it."""
        d: dict[str, Any] = {"kind": self.kind, **self.params}
        if self.kind == "prompt":
            d["system_prompt"] = self.system_prompt
        if self.vectors is not None:  # steered, sae
            d.update(coeff=self.coeff, positions=self.positions, hooks=sorted(self.vectors))
        if self.chat_template_kwargs:
            d["chat_template_kwargs"] = self.chat_template_kwargs
        return d

    # --- prompts
    def messages(self, user: str) -> list[dict[str, str]]:
        """The chat the teacher sees (with its system prompt if it has one)."""
        msgs = [{"role": "system", "content": self.system_prompt}] if self.system_prompt else []
        return msgs + [{"role": "user", "content": user}]

    def prompt_ids(self, user: str) -> list[int]:
        """Token ids of the teacher's prompt, ending with the assistant header."""
        return chat_prompt_ids(self.lm.tokenizer, self.messages(user), self.chat_template_kwargs)

    # --- generation
    @contextmanager
    def generating(self) -> Iterator[PreTrainedModel]:
        """The model, steered if this is a steered / sae teacher (hooks removed on exit)."""
        vs, coeff, positions = self.vectors, self.coeff, self.positions
        with steer(self.lm.model, vs, coeff=coeff, positions=positions) if vs else nullcontext():
            yield self.lm.model

    def sample(
        self, users: Sequence[str], stats: SampleStats | None = None, **kwargs: Any
    ) -> list[Sample]:
        """Completions for user prompts; kwargs go to generate.sample."""
        ids = [self.prompt_ids(u) for u in users]
        with self.generating():
            return sample(self.lm, ids, stats=stats, **kwargs)

    # --- teacher-forced scoring
    @contextmanager
    def scoring(
        self,
        completion_mask: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
    ) -> Iterator[PreTrainedModel]:
        """The model under this teacher for one teacher-forced pass over prompt + completion.

        Inputs must be built as `prompt_ids(user)` (system prompt included) + completion ids.
        completion_mask: bool [batch, pos], True on completion tokens; needed for steered
        teachers with positions "prompt" or "response" (then the steering hits exactly the
        positions it hit during generation). attention_mask [batch, pos] marks real tokens
        (padding is neither prompt nor response).
        """
        if self.vectors is None:
            yield self.lm.model
            return
        kind, _ = parse_positions(self.positions)
        positions: Any = self.positions
        if kind in ("prompt", "response"):
            if completion_mask is None:
                raise TeacherError(
                    f"This teacher steers positions={self.positions!r}; pass completion_mask "
                    "[batch, pos] to scoring() so prompt and response tokens can be told apart."
                )
            cm = completion_mask.bool()
            real = attention_mask.bool() if attention_mask is not None else torch.ones_like(cm)
            positions = cm & real if kind == "response" else ~cm & real
        with steer(self.lm.model, self.vectors, coeff=self.coeff, positions=positions):
            yield self.lm.model

    def hidden_states(
        self, model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor
    ) -> torch.Tensor:
        """Final-normed hidden [b, s, d] of one teacher-forced pass over right-padded rows,
        inside `scoring`. The tokens all rows start with run once
        (`generate.prefix.shared_prefix_hidden`) unless this teacher steers only some
        positions (a mask over whole rows, or first:k counted in the model's forward)."""
        kind = parse_positions(self.positions)[0] if self.vectors is not None else "all"
        run = shared_prefix_hidden if kind == "all" else full_hidden
        return run(model, input_ids, attention_mask)

    def completion_logprobs(
        self,
        users: Sequence[str],
        completions: Sequence[Sequence[int]],
        batch_size: int = 16,
    ) -> list[torch.Tensor]:
        """log p_teacher(completion token t | prompt, earlier tokens) for each row: [n_i].

        completions: token ids as stored in a dataset row's "completion_ids".
        The mean of -logprob over tokens is the teacher's loss on the data.
        """
        model, device = self.lm.model, self.lm.device
        pad = self.lm.tokenizer.pad_token_id or 0
        out: list[torch.Tensor] = []
        for s in range(0, len(users), batch_size):
            prompts = [self.prompt_ids(u) for u in users[s : s + batch_size]]
            comps = [list(c) for c in completions[s : s + batch_size]]
            seqs = [p + c for p, c in zip(prompts, comps, strict=True)]
            L = max(len(x) for x in seqs)
            ids = torch.full((len(seqs), L), pad, dtype=torch.long, device=device)  # [b, L]
            attn = torch.zeros_like(ids)
            cmask = torch.zeros_like(ids, dtype=torch.bool)
            for r, (p, x) in enumerate(zip(prompts, seqs, strict=True)):
                ids[r, : len(x)] = torch.tensor(x, device=device)
                attn[r, : len(x)] = 1
                cmask[r, len(p) : len(x)] = True
            with torch.inference_mode(), self.scoring(cmask, attn):
                hidden = self.hidden_states(model, ids, attn)  # [b, L, d]
                logits = lm_head(model, hidden).float()  # [b, L, V]
            lp = logits[:, :-1].log_softmax(-1).gather(-1, ids[:, 1:, None]).squeeze(-1)
            for r, (p, x) in enumerate(zip(prompts, seqs, strict=True)):
                out.append(lp[r, len(p) - 1 : len(x) - 1].cpu())  # predictions of completion
        return out


def build_teacher(
    config: TeacherConfig | Mapping[str, Any],
    base_lm: LoadedModel | nn.Module,
    vectors: VectorSet | None = None,
    gaussians: Mapping[str, Gaussian] | None = None,
    whiten_texts: Sequence[str] | None = None,
) -> Teacher:
    """Turn a TeacherConfig or a spec dict (as in a manifest's "teacher") into a Teacher.

    base_lm: a LoadedModel, or a bare HF model (then the teacher can score but has no
    tokenizer for `prompt_ids` / `sample`). vectors: an in-memory VectorSet for kind
    "steered"; else the spec's "vectors" is loaded (a .safetensors path, or a mapping
    {hook: tensor} used as it is). coeff_units "whitened": the vectors are rescaled to 1
    whitened unit at their hooks, by `gaussians`, the spec's "whiten" file, or a Gaussian fitted
    on `whiten_texts` (see whitened_teacher_vectors). Raises TeacherError with what to fix.
    """
    spec = config.spec() if isinstance(config, TeacherConfig) else dict(config)
    if not isinstance(base_lm, LoadedModel):  # scores only: no tokenizer, no hashing pass
        base_lm = wrap_model(base_lm, weights_hash="in-memory")  # type: ignore[arg-type]
    kind = spec.pop("kind", None)
    tkw = spec.pop("chat_template_kwargs", None) or {}
    if kind not in KINDS:
        raise TeacherError(f"Unknown teacher kind {kind!r}; use one of {', '.join(KINDS)}.")
    if kind == "plain":
        return Teacher("plain", base_lm, params=spec, chat_template_kwargs=tkw)
    if kind == "prompt":
        system = spec.pop("system_prompt", None)
        if not system and spec.get("persona"):
            system = persona_prompt(spec["persona"])
        if not system:
            animal = spec.get("animal")
            if not animal:
                raise TeacherError("A prompt teacher needs 'animal' (e.g. owl) or 'system_prompt'.")
            system = trait_system_prompt(animal, spec.setdefault("category", "animal"))
        return Teacher(
            "prompt", base_lm, system_prompt=system, params=spec, chat_template_kwargs=tkw
        )
    if kind in ("steered", "sae"):
        coeff = float(spec.pop("coeff", 1.0))
        positions = str(spec.pop("positions", "all"))
        spec.pop("hooks", None)
        try:
            parse_positions(positions)
        except ValueError as e:
            raise TeacherError(str(e)) from e
        if kind == "sae":
            vectors = sae_latent_vectors(spec, base_lm)
        if vectors is None and isinstance(spec.get("vectors"), Mapping):  # in memory
            given = spec.pop("vectors")
            vectors = given if isinstance(given, VectorSet) else VectorSet(dict(given))
        if vectors is None:
            path = spec.get("vectors")
            if not path:
                raise TeacherError(
                    "A steered teacher needs 'vectors' (a VectorSet .safetensors path)."
                )
            try:
                vectors = VectorSet.load(path, base_lm)
            except VectorSetError as e:
                raise TeacherError(f"Cannot steer {base_lm.spec!r} with {path}: {e}") from e
            spec["vectors_sha256"] = file_sha256(path)[:16]
        else:
            try:
                vectors.check_fits(base_lm)
            except VectorSetError as e:
                raise TeacherError(f"Cannot steer {base_lm.spec!r} with these vectors: {e}") from e
        vectors = whitened_teacher_vectors(vectors, base_lm, spec, gaussians, whiten_texts)
        return Teacher(
            kind,
            base_lm,
            vectors=vectors,
            coeff=coeff,
            positions=positions,
            params=spec,
            chat_template_kwargs=tkw,
        )
    # adapter
    path = spec.get("path")
    if not path:
        raise TeacherError("An adapter teacher needs 'path' (a PEFT adapter or model folder).")
    lm = load_adapted(path, base_lm)
    spec["weights_hash"] = lm.weights_hash
    return Teacher("adapter", lm, params=spec, chat_template_kwargs=tkw)


def whitened_teacher_vectors(
    vectors: VectorSet,
    lm: LoadedModel,
    spec: dict[str, Any],
    gaussians: Mapping[str, Gaussian] | None = None,
    texts: Sequence[str] | None = None,
) -> VectorSet:
    """The vectors a teacher with spec["coeff_units"] = "whitened" steers with: each rescaled
    by 1 / ||v||_M at its hook, so the teacher's coeff is in whitened units. The scale per hook
    is recorded in spec["whitened_scale"]; a spec that has it (a dataset manifest) is rebuilt
    from it unless a Gaussian is given. "l2" (the default) leaves the vectors as they are."""
    units = spec.get("coeff_units", "l2")
    if units == "l2":
        return vectors
    if units != "whitened":
        raise TeacherError(f"coeff_units {units!r}: use 'l2' or 'whitened'.")
    given = dict(gaussians or {})
    recorded = spec.get("whitened_scale") or {}
    try:
        if spec.get("whiten"):  # one file: the hook of a one-hook set (checked)
            for hook, g in place_gaussian(Gaussian.load(spec["whiten"]), list(vectors)).items():
                given.setdefault(hook, g)
        scale = {h: float(recorded[h]) for h in vectors if h not in given and h in recorded}
        measured = [h for h in vectors if h not in scale]
        gs = resolve_gaussians(lm, measured, given, texts)
        scale |= {h: whitened_coeff(gs[h], vectors[h], 1.0) for h in measured}
    except WhitenError as e:
        raise TeacherError(f"coeff_units 'whitened' (whiten = {spec.get('whiten')!r}): {e}") from e
    spec["whitened_scale"] = scale = {h: scale[h] for h in vectors}  # in the set's order
    meta = {**vectors.metadata, "coeff_units": "whitened"}
    return VectorSet({h: (v.double() * scale[h]).to(v.dtype) for h, v in vectors.items()}, meta)


def sae_latent_vectors(spec: dict[str, Any], lm: LoadedModel) -> VectorSet:
    """An sae teacher's steering {sae.hook: W_dec[latent]}; records hook and sha256 in `spec`."""
    path, latent = spec.get("sae"), spec.get("latent")
    if not path or latent is None:
        raise TeacherError("An sae teacher needs 'sae' (--sae PATH) and 'latent' (--latent N).")
    try:
        sae = load_sae(path, lm, hook=spec.get("hook"))  # checked against the model
        direction = sae.latent(latent)  # [d_in]; out of range: names the range
    except SAEError as e:
        raise TeacherError(f"sae teacher (--sae {path} --latent {latent}): {e}") from e
    sha = sae.source.get("sha256")
    if spec.get("sae_sha256", sha) != sha:
        why = "changed since this teacher was recorded (sha256): restore it or regenerate the data"
        raise TeacherError(f"sae (--sae): {path} {why}.")
    spec.update(sae=str(path), sae_sha256=sha, hook=sae.hook, latent=int(latent))
    return VectorSet({str(sae.hook): direction.detach().clone()}, {"sae": str(path)})


def load_adapted(path: str | os.PathLike, base_lm: LoadedModel) -> LoadedModel:
    """A PEFT LoRA adapter folder (merged into a copy of the base model) or a full
    finetuned model folder (loaded; the base tokenizer is used). The base is not modified."""
    folder = Path(path)
    if not folder.is_dir():
        raise TeacherError(f"Adapter path {folder} is not a folder.")
    if (folder / "adapter_config.json").exists():
        return _load_peft(folder, base_lm)
    if (folder / "config.json").exists():
        return _load_full(folder, base_lm)
    raise TeacherError(
        f"{folder} holds neither adapter_config.json (a PEFT adapter) nor config.json "
        "(a finetuned model); point --adapter at the folder written by the trainer."
    )


def _load_peft(folder: Path, base_lm: LoadedModel) -> LoadedModel:
    try:
        cfg = json.loads((folder / "adapter_config.json").read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise TeacherError(f"{folder}/adapter_config.json is not valid JSON: {e}") from e
    if not isinstance(cfg, dict) or "peft_type" not in cfg:
        raise TeacherError(f"{folder}/adapter_config.json has no 'peft_type'; not a PEFT adapter.")
    names = ("adapter_model.safetensors", "adapter_model.bin")
    weights = [p for p in folder.iterdir() if p.name in names]
    if not weights:
        raise TeacherError(
            f"{folder} has adapter_config.json but no adapter_model.safetensors / .bin weights."
        )
    try:
        check_adapter_base(folder, base_lm)
    except AdapterError as e:  # a teacher's errors are TeacherErrors
        raise TeacherError(str(e)) from e
    from peft import PeftModel

    model = copy.deepcopy(base_lm.model)
    try:
        peft_model = PeftModel.from_pretrained(model, str(folder), is_trainable=False)
        merged = peft_model.merge_and_unload()
    except Exception as e:  # peft raises many types for mismatched adapters
        raise TeacherError(
            f"Could not apply the adapter in {folder} to {base_lm.spec!r} "
            f"({e.__class__.__name__}: {str(e).splitlines()[0] if str(e) else ''}); "
            "was it trained on this base model?"
        ) from e
    merged.eval().requires_grad_(False)
    h = hashlib.sha256((base_lm.weights_hash + weights_hash_of_files(weights)).encode())
    return LoadedModel(
        model=merged,
        tokenizer=base_lm.tokenizer,
        spec=f"{base_lm.spec}+lora:{folder}",
        source=str(folder),
        weights_hash=h.hexdigest()[:16],
        extra={"base_model": base_lm.spec, "adapter_config": cfg},
    )


def _load_full(folder: Path, base_lm: LoadedModel) -> LoadedModel:
    from transformers import AutoModelForCausalLM

    try:
        model = AutoModelForCausalLM.from_pretrained(
            str(folder), dtype=next(base_lm.model.parameters()).dtype
        )
    except (OSError, ValueError, KeyError) as e:
        raise TeacherError(f"Could not load the finetuned model in {folder}: {e}") from e
    if model.config.vocab_size != base_lm.model.config.vocab_size:
        raise TeacherError(
            f"{folder} has vocab size {model.config.vocab_size} but the base tokenizer's model "
            f"has {base_lm.model.config.vocab_size}; it is not a finetune of {base_lm.spec!r}."
        )
    model.to(base_lm.device).eval().requires_grad_(False)
    files = [p for p in folder.iterdir() if p.suffix in (".safetensors", ".bin")]
    if not files:
        raise ModelLoadError(f"{folder} has no weight files")
    return LoadedModel(
        model=model,
        tokenizer=base_lm.tokenizer,
        spec=str(folder),
        source=str(folder),
        weights_hash=weights_hash_of_files(files),
        extra={"base_model": base_lm.spec},
    )
