"""Text corpora for the activation-difference lens and monitoring.

`load_corpus()` with no argument gives the offline default that ships with steerdiff:
1,200 documents in five genres (Shakespeare, King James Bible, Python reference docs,
Python standard-library code, chatbot dialogue); see data/CORPUS_SOURCES.md.
Other specs: a local .txt (one document per line, or per blank-line-separated block
with ``txt_blocks=True``), .jsonl / .jsonl.gz (field "text", or "messages" chats joined),
a folder of .txt files (one document each), or a Hugging Face dataset name, ORG/NAME or
hf:ORG/NAME[:split] (needs hub access and the `hub` extra; steerdiff.hubdata loads it).
"""

from __future__ import annotations

import gzip
import json
import random
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

from ..errors import SteerdiffError
from ..hubdata import HubDataError, load_hf_rows

DEFAULT_CORPUS = "default"
_DEFAULT_FILE = "corpus_default.jsonl.gz"


class CorpusError(SteerdiffError, ValueError):
    """The corpus is empty, missing, or cannot be read."""


@dataclass
class Corpus:
    texts: list[str]
    source: str
    genres: list[str] | None = None
    meta: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.texts)


def _row_text(row: dict, text_field: str) -> str | None:
    if text_field in row and isinstance(row[text_field], str):
        return row[text_field]
    msgs = row.get("messages")
    if isinstance(msgs, list):
        return "\n".join(str(m.get("content", "")) for m in msgs if isinstance(m, dict))
    return None


def _read_jsonl(path: Path, text_field: str) -> tuple[list[str], list[str] | None]:
    opener = gzip.open if path.suffix == ".gz" else open
    texts, genres = [], []
    with opener(path, "rt", encoding="utf-8") as f:
        for i, line in enumerate(f):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise CorpusError(f"{path}: line {i + 1} is not JSON ({e})") from e
            t = _row_text(row, text_field) if isinstance(row, dict) else None
            if t is None:
                raise CorpusError(
                    f"{path}: line {i + 1} has no string field {text_field!r} nor 'messages'"
                )
            texts.append(t)
            genres.append(row.get("genre", ""))
    return texts, (genres if any(genres) else None)


def default_corpus_path() -> Path:
    return Path(str(resources.files("steerdiff") / "data" / _DEFAULT_FILE))


def load_corpus(
    spec: str | Path | list[str] | None = None,
    n: int | None = None,
    seed: int = 0,
    text_field: str = "text",
    split: str = "train",
    txt_blocks: bool = False,
    min_chars: int = 1,
) -> Corpus:
    """Load texts. n: how many (a seeded random subset; None = all). Raises CorpusError."""
    genres: list[str] | None = None
    if isinstance(spec, list):
        texts, source = list(spec), "in-memory"
    else:
        spec = DEFAULT_CORPUS if spec is None else spec
        path = Path(spec).expanduser()
        if str(spec) == DEFAULT_CORPUS:
            path = default_corpus_path()
            if not path.exists():
                raise CorpusError(f"The default corpus is missing from the install ({path}).")
            texts, genres = _read_jsonl(path, "text")
            source = "steerdiff default corpus (drama, scripture, docs, code, dialogue)"
        elif path.is_dir():
            files = sorted(path.glob("*.txt"))
            texts = [f.read_text(errors="replace") for f in files]
            source = str(path)
        elif path.exists():
            name = path.name
            if name.endswith((".jsonl", ".jsonl.gz", ".json")):
                texts, genres = _read_jsonl(path, text_field)
            else:
                raw = path.read_text(errors="replace")
                parts = raw.split("\n\n") if txt_blocks else raw.splitlines()
                texts = [p.strip() for p in parts]
            source = str(path)
        elif str(spec).startswith((".", "/", "~")) or path.suffix in (".txt", ".jsonl", ".gz"):
            raise CorpusError(f"Corpus file not found: {spec}")
        else:
            name = str(spec).removeprefix("hf:")
            texts, source = _load_hf(name, n, split, text_field), f"hf:{name}"
    keep = [i for i, t in enumerate(texts) if t and len(t.strip()) >= min_chars]
    texts = [texts[i] for i in keep]
    genres = [genres[i] for i in keep] if genres else None
    if not texts:
        raise CorpusError(
            f"The corpus {source!r} has no texts (after dropping empty ones); give a file with "
            "at least one non-empty document, or use the default corpus."
        )
    if n is not None:
        if n <= 0:
            raise CorpusError(f"n must be positive, got {n}")
        if n > len(texts):
            raise CorpusError(
                f"Asked for {n} texts but the corpus {source!r} has only {len(texts)}; "
                "ask for fewer (or n=None for all)."
            )
        idx = sorted(random.Random(seed).sample(range(len(texts)), n))
        texts = [texts[i] for i in idx]
        genres = [genres[i] for i in idx] if genres else None
    return Corpus(texts, source, genres, {"seed": seed, "n": len(texts)})


def as_corpus(
    texts: Corpus | list[str] | str | Path | None, n: int | None = None, seed: int = 0
) -> Corpus:
    """The Corpus a reader works on: a Corpus as it is (or a seeded subset of n of its texts),
    else whatever load_corpus reads (None: the offline default). Raises CorpusError."""
    if isinstance(texts, Corpus):
        corpus = texts if n is None else load_corpus(texts.texts, n=n, seed=seed)
    else:
        corpus = load_corpus(texts, n=n, seed=seed)
    if len(corpus) == 0:
        raise CorpusError("The corpus is empty: give texts or a corpus spec with documents.")
    return corpus


def _load_hf(name: str, n: int | None, split: str, text_field: str) -> list[str]:
    """Texts of a Hugging Face dataset (steerdiff.hubdata: the one hub loader)."""
    try:
        rows, label = load_hf_rows(name, split, n)
    except HubDataError as e:
        raise CorpusError(f"{e} Without hub access use the default corpus (`default`).") from e
    out = []
    for row in rows:
        t = _row_text(row, text_field)
        if t is None:
            raise CorpusError(f"Dataset {label} rows have no field {text_field!r}")
        out.append(t)
    return out
