"""Plain progress lines for log files (steerdiff.progress)."""

import io

from steerdiff.progress import NoProgress, PlainProgress, progress


def test_plain_progress_prints_lines_with_counts_and_closes_once() -> None:
    # Bug caught: a log file gets nothing (or a carriage-return bar) while a long job runs.
    out = io.StringIO()
    bar = PlainProgress(total=4, desc="fit", every_s=0.0, file=out)
    bar.update(1)
    bar.set_postfix(loss="0.50")
    bar.update(1)
    bar.close()
    bar.close()
    lines = out.getvalue().splitlines()
    assert len(lines) == 3  # two updates (interval 0) and one close; a second close prints nothing
    assert lines[0].startswith("fit: 1/4 (25%)")
    assert lines[1].startswith("fit: 2/4 (50%)") and lines[1].endswith("loss=0.50")
    assert "\r" not in out.getvalue()


def test_plain_progress_waits_for_interval() -> None:
    # Bug caught: one line per step floods a log file.
    out = io.StringIO()
    bar = PlainProgress(total=100, desc="gen", every_s=3600.0, file=out)
    for _ in range(100):
        bar.update(1)
    assert out.getvalue() == ""
    bar.close()
    assert out.getvalue().startswith("gen: 100/100 (100%)")


def test_progress_not_a_terminal_is_plain_and_disable_is_silent(capsys) -> None:
    # pytest's captured stderr is not a terminal: a log file, as far as progress knows.
    assert isinstance(progress(3, "x"), PlainProgress)
    assert isinstance(progress(3, "x", disable=True), NoProgress)
