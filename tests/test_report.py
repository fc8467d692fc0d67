"""The HTML report: self-contained, sections and plots visible in a real browser."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import pytest

from steerdiff.report.browser import find_chromium, view_in_chromium
from steerdiff.report.html import Code, Figure, Report, Table, Text, render, write


def small_report() -> Report:
    r = Report("Owl experiment", subtitle="test run")
    s = r.section("Trait evaluation")
    s.add(Text("Owl share rose from 2.7% to 22% <b>not bold</b>."))
    s.add(
        Table([{"model": "base", "owl": 0.027}, {"model": "teacher", "owl": 0.22}], caption="rates")
    )
    fig, ax = plt.subplots()
    ax.bar(["base", "teacher"], [0.027, 0.22])
    s.add(Figure.from_matplotlib(fig, "owl share"))
    r.section("Provenance").add(Code({"model": "default", "seed": 0}))
    return r


def test_render_is_self_contained_and_escaped():
    page = render(small_report())
    assert page.count("data:image/png;base64,") == 1
    assert "&lt;b&gt;not bold&lt;/b&gt;" in page and "<b>not bold" not in page
    assert "0.027" in page and 'src="http' not in page


@pytest.mark.skipif(find_chromium() is None, reason="Debian's chromium is not installed")
def test_report_renders_in_headless_chromium(tmp_path):
    path = write(small_report(), tmp_path / "report.html")
    view = view_in_chromium(path, screenshot=tmp_path / "shot.png")
    assert view.section_titles == ["Trait evaluation", "Provenance"]
    assert view.n_images == 1 and view.n_images_decoded == 1
    assert (tmp_path / "shot.png").stat().st_size > 5000
