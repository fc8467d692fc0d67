"""Progress for long work: a tqdm bar on a terminal, plain periodic lines in a log file.

A progress bar redraws itself with carriage returns, which is useless when stderr goes to a
log file (`steerdiff fit ... 2> fit.log`). `progress(...)` returns a tqdm bar when stderr is a
terminal and otherwise a `PlainProgress`, which prints one ordinary line every `every_s`
seconds and one when it closes:

    fit: 120/400 (30%) 95 s elapsed, ~222 s left loss=0.41

Both have the same small interface (`update`, `set_postfix`, `close`, and `with`).
"""

from __future__ import annotations

import os
import sys
import time
from typing import Any, TextIO

# Seconds between plain lines; STEERDIFF_PROGRESS_EVERY overrides it (e.g. 5 in a quick test).
DEFAULT_EVERY_S = 30.0


class PlainProgress:
    """tqdm's interface, printed as a plain line every `every_s` seconds (for log files)."""

    def __init__(
        self,
        total: int | None,
        desc: str,
        initial: int = 0,
        every_s: float = DEFAULT_EVERY_S,
        file: TextIO | None = None,
    ) -> None:
        self.total, self.desc, self.n = total, desc, initial
        self.every_s, self.file = every_s, file
        self.postfix = ""
        self.start = self.last = time.monotonic()
        self.initial = initial
        self.closed = False

    def line(self) -> str:
        elapsed = time.monotonic() - self.start
        done = f"{self.n}/{self.total}" if self.total else f"{self.n}"
        if self.total:
            done += f" ({100 * self.n / self.total:.0f}%)"
        text = f"{self.desc}: {done} {elapsed:.0f} s elapsed"
        rate = (self.n - self.initial) / elapsed if elapsed > 0 else 0.0
        if self.total and rate > 0 and self.n < self.total:
            text += f", ~{(self.total - self.n) / rate:.0f} s left"
        return text + (f" {self.postfix}" if self.postfix else "")

    def emit(self) -> None:
        print(self.line(), file=self.file or sys.stderr, flush=True)
        self.last = time.monotonic()

    def update(self, n: int = 1) -> None:
        self.n += n
        if time.monotonic() - self.last >= self.every_s:
            self.emit()

    def set_postfix(
        self, ordered_dict: dict | None = None, refresh: bool = True, **kw: Any
    ) -> None:
        items = {**(ordered_dict or {}), **kw}
        self.postfix = " ".join(f"{k}={v}" for k, v in items.items())

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.emit()

    def __enter__(self) -> PlainProgress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class NoProgress:
    """The same interface, printing nothing (`disable=True`)."""

    def update(self, n: int = 1) -> None:
        pass

    def set_postfix(self, *a: Any, **kw: Any) -> None:
        pass

    def close(self) -> None:
        pass

    def __enter__(self) -> NoProgress:
        return self

    def __exit__(self, *exc: object) -> None:
        pass


def progress(
    total: int | None, desc: str, initial: int = 0, disable: bool = False
) -> Any:  # tqdm | PlainProgress | NoProgress (tqdm's type is not worth importing here)
    """A progress bar on a terminal, plain periodic lines otherwise, nothing if `disable`."""
    if disable:
        return NoProgress()
    if sys.stderr.isatty():
        from tqdm.auto import tqdm

        return tqdm(total=total, initial=initial, desc=desc, leave=False)
    every = float(os.environ.get("STEERDIFF_PROGRESS_EVERY", DEFAULT_EVERY_S))
    return PlainProgress(total, desc, initial=initial, every_s=every)
