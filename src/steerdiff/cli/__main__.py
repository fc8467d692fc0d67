"""`python -m steerdiff.cli ...` (e.g. under `accelerate launch -m steerdiff.cli fit ...`)."""

import os

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from steerdiff.cli import app  # noqa: E402

app()
