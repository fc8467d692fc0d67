"""SAEs on the Hugging Face hub: "hf:ORG/REPO[/FOLDER/IN/REPO]" -> a local copy.

    load_sae("hf:google/gemma-scope-2b-pt-res/layer_20/width_16k/average_l0_71",
             hook="blocks.20.hook_resid_post")

downloads only that folder (huggingface_hub, which transformers already installs) into the
Hugging Face cache and loads it like a local one. With no network, or with HF_HUB_OFFLINE set
and no cached copy, it fails in one line (`SAEError`) saying what to do instead: download the
folder on a machine with network and pass its path.
"""

from __future__ import annotations

from pathlib import Path

from ..models import HUB_TIMEOUT_S, hub_offline
from .core import SAEError

HF_PREFIX = "hf:"
OFFLINE_FIX = (
    "download the folder on a machine with network (`hf download ORG/REPO --include "
    "'FOLDER/*'`) and pass its local path instead"
)


def is_hub_spec(spec: str) -> bool:
    """True for "hf:ORG/REPO[/FOLDER...]" (local paths never start with "hf:")."""
    return spec.startswith(HF_PREFIX)


def parse_hub_spec(spec: str) -> tuple[str, str]:
    """ "hf:ORG/REPO/a/b" -> ("ORG/REPO", "a/b"); the folder may be ""."""
    parts = [p for p in spec.removeprefix(HF_PREFIX).split("/") if p]
    if len(parts) < 2:
        raise SAEError(
            f"{spec!r} is not an SAE on the hub: write hf:ORG/REPO or hf:ORG/REPO/FOLDER "
            "(the folder holding cfg.json + weights, or params.npz)."
        )
    return "/".join(parts[:2]), "/".join(parts[2:])


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else e.__class__.__name__


def download_sae(spec: str) -> Path:
    """The local path of the SAE folder (or params.npz) `spec` names, downloaded if needed."""
    from huggingface_hub import snapshot_download

    repo, folder = parse_hub_spec(spec)
    patterns = [f"{folder}/*"] if folder else None
    offline = hub_offline()
    try:
        root = snapshot_download(
            repo,
            allow_patterns=patterns,
            local_files_only=offline,
            etag_timeout=HUB_TIMEOUT_S,
        )
    except Exception as e:  # offline, no such repo, gated, network errors
        why = (
            "HF_HUB_OFFLINE is set and the Hugging Face cache does not hold it"
            if offline
            else (f"{e.__class__.__name__}: {_first_line(e)}")
        )
        raise SAEError(f"Cannot download the SAE {spec!r} ({why}); {OFFLINE_FIX}.") from None
    path = Path(root) / folder if folder else Path(root)
    if not path.exists():
        raise SAEError(
            f"The hub repo {repo!r} has no {folder!r}: check the folder name on "
            f"https://huggingface.co/{repo}/tree/main."
        )
    if path.is_dir() and not any(path.iterdir()):
        raise SAEError(f"{spec!r} downloaded an empty folder; check the folder name.")
    npz = path / "params.npz"
    return npz if npz.is_file() else path
