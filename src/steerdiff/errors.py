"""The one base of every error steerdiff raises on purpose.

Every error class in the package subclasses `SteerdiffError`, so callers (the CLI, a
notebook, a pipeline) can catch the package's own errors with one `except`, and each
message says what is wrong and how to fix it. Most also keep a builtin base
(`ValueError` for bad input, `RuntimeError` for a failed environment) so code written
against those keeps working.
"""

from __future__ import annotations


class SteerdiffError(Exception):
    """Base of every error the package raises; the message names the problem and the fix."""
