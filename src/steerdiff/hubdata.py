"""The one loader of Hugging Face hub datasets (the `hub` extra: `pip install
'steerdiff[hub]'`), for `fit --data hf:ORG/NAME[:split]` and `interpret.corpus`.

Every failure is one line that says what happened and what to do: `datasets` missing, no
network (the hub is asked once, HUB_TIMEOUT_S, no retries: `datasets` itself retries for
about 25 s first), no such dataset, a gated one, an unknown split. With HF_DATASETS_OFFLINE
or HF_HUB_OFFLINE set the hub is not asked and the local Hugging Face cache is read.
"""

from __future__ import annotations

import os
from typing import Any

from .errors import SteerdiffError

HF_PREFIX = "hf:"
HUB_TIMEOUT_S = 10.0  # seconds the one probe request may take
INSTALL = "pip install 'steerdiff[hub]'"
OFFLINE_FIX = (
    "download it on a machine with network (datasets.load_dataset(NAME, split=SPLIT)"
    ".to_json('data.jsonl')) and pass the JSONL file instead, or set HF_DATASETS_OFFLINE=1 "
    "to read a copy already in the Hugging Face cache"
)


class HubDataError(SteerdiffError, RuntimeError):
    """A Hugging Face dataset could not be loaded; the message says why and what to do."""


def parse_hf_spec(spec: str, default_split: str = "train") -> tuple[str, str]:
    """ "hf:ORG/NAME[:split]" (or "ORG/NAME[:split]") -> (name, split)."""
    body = spec.removeprefix(HF_PREFIX)
    name, _, split = body.partition(":")
    if not name or name.count("/") > 1 or name.startswith("/") or name.endswith("/"):
        raise HubDataError(
            f"{spec!r} is not a Hugging Face dataset id: write hf:ORG/NAME or "
            "hf:ORG/NAME:SPLIT (e.g. hf:HuggingFaceH4/ultrachat_200k:train_sft)."
        )
    return name, split or default_split


def offline() -> bool:
    """HF_DATASETS_OFFLINE or HF_HUB_OFFLINE is set: read the cache, never ask the hub."""
    flags = (os.environ.get("HF_DATASETS_OFFLINE"), os.environ.get("HF_HUB_OFFLINE"))
    return any((f or "").strip().upper() in {"1", "ON", "YES", "TRUE"} for f in flags)


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else e.__class__.__name__


def _probe(name: str) -> None:
    """Ask the hub once whether `name` is there; HubDataError in one line if not."""
    from huggingface_hub import HfApi
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError

    try:
        HfApi().dataset_info(name, timeout=HUB_TIMEOUT_S)
    except GatedRepoError as e:
        raise HubDataError(
            f"The Hugging Face dataset {name!r} is gated: accept its terms on "
            f"https://huggingface.co/datasets/{name} and set HF_TOKEN (or `hf auth login`)."
        ) from e
    except RepositoryNotFoundError as e:
        raise HubDataError(
            f"No dataset {name!r} on the Hugging Face hub: check the id (ORG/NAME), set "
            "HF_TOKEN if it is private, or pass a local JSONL file."
        ) from e
    except Exception as e:  # network errors, timeouts, server errors
        raise HubDataError(
            f"Could not reach the Hugging Face hub for the dataset {name!r} "
            f"({e.__class__.__name__}: {_first_line(e)}): {OFFLINE_FIX}."
        ) from e


def load_hf_rows(
    spec: str, split: str | None = None, n: int | None = None
) -> tuple[list[dict[str, Any]], str]:
    """The rows of a Hugging Face dataset as dicts, and its label "hf:ORG/NAME:split".

    spec: "hf:ORG/NAME[:split]" or "ORG/NAME" (split: the one in spec, else `split`,
    else "train"). n: the first n rows only (streamed when the hub is reachable).
    Raises HubDataError (one line) on any failure."""
    name, split = parse_hf_spec(spec, split or "train")
    label = f"{HF_PREFIX}{name}:{split}"
    try:
        import datasets
    except ImportError as e:
        raise HubDataError(
            f"{label} is a Hugging Face dataset; loading one needs the `datasets` package: "
            f"{INSTALL} (or pass a local JSONL file)."
        ) from e
    is_offline = offline()
    if not is_offline:
        _probe(name)
    try:
        ds = datasets.load_dataset(name, split=split, streaming=n is not None and not is_offline)
        rows = ds.take(n) if n is not None and hasattr(ds, "take") else ds
        out = [dict(r) for r in rows]
    except Exception as e:  # an unknown split, a dataset not in the cache, ...
        why = f"{e.__class__.__name__}: {_first_line(e)}"
        fix = OFFLINE_FIX if is_offline else "check the split name (e.g. :train, :test)"
        raise HubDataError(
            f"Could not load the Hugging Face dataset {label} ({why}); {fix}."
        ) from None
    if n is not None:
        out = out[:n]
    if not out:
        raise HubDataError(f"The Hugging Face dataset {label} has no rows: nothing to read.")
    return out, label
