"""The steering report: per chosen (or most steerable) feature, the generations at each scale and prompt beside the
unsteered ones, with their metrics and the feature's Neuronpedia link, in one self-contained HTML file. Rendered
in headless Chromium when it is installed; parsed in every case."""

import shutil
import subprocess
from html.parser import HTMLParser

import pytest

from runner.errors import ConfigError
from runner.plan.points import SteeringPoint
from runner.results import PointResult
from runner.tracking.records import PointRecord
from runner.tracking.report import write_report

SCALES = (0.0, 8.0, 16.0)


def record(prompt_index: int, seed: int, feature: int, scale: float) -> PointRecord:
    point = SteeringPoint(prompt_index=prompt_index, prompt=["Tell me about", "Once upon a time"][prompt_index],
                          layer=1, feature=feature, scale=scale, seed=seed, mode="add", positions="all",
                          temperature=0.5, top_k=None, top_p=None, max_new_tokens=4, model_id="synthetic:tiny",
                          sae_id="sae", neuronpedia_url=f"https://www.neuronpedia.org/x/1-res/{feature}")
    text = f"p{prompt_index}s{seed}f{feature}x{scale:g}"
    if scale == 16.0 and feature == 5:
        text = "<script>alert(1)</script>"
    rate = scale / (20 if feature == 5 else 80)
    metrics = {"steer/concept_rate": rate, "steer/nll": 2.0 + scale / 16, "steer/kl_steered_base": scale / 32}
    return PointRecord.finished(point, PointResult(point.point_key, text, (1, 2), metrics,
                                                   tags={"logit_lens_tokens": '["Paris", "tower"]'}))


@pytest.fixture
def records() -> list[PointRecord]:
    return [record(p, s, f, x) for p in (0, 1) for f in (3, 5) for x in SCALES for s in (0, 1)]


class Page(HTMLParser):
    """What a test reads of the page: headings, each grid's rows of cell texts, links, and any resource tags."""

    def __init__(self, html: str) -> None:
        super().__init__()
        self.headings: list[str] = []
        self.grids: list[list[list[str]]] = []
        self.links: list[str] = []
        self.resources: list[str] = []
        self._in: list[str] = []
        self._text: list[str] = []
        self.feed(html)

    def handle_starttag(self, tag, attrs):
        attributes = dict(attrs)
        if tag in ("script", "link", "img", "iframe") or "src" in attributes:
            self.resources.append(tag)
        if tag == "a":
            self.links.append(attributes.get("href", ""))
        if tag == "table" and attributes.get("class") == "grid":
            self.grids.append([])
        if tag == "tr" and self.grids and "grid" in self._in:
            self.grids[-1].append([])
        if tag in ("td", "th", "h2"):
            self._text = []
        self._in.append(attributes.get("class") or tag)

    def handle_endtag(self, tag):
        if tag in ("td", "th") and self.grids and "grid" in self._in:
            self.grids[-1][-1].append(" ".join("".join(self._text).split()))
        if tag == "h2":
            self.headings.append(" ".join("".join(self._text).split()))
        self._in.pop()

    def handle_data(self, data):
        self._text.append(data)


def test_a_chosen_feature_gets_a_grid_of_scales_across_and_prompts_down(records, tmp_path) -> None:
    path = write_report(tmp_path / "report.html", records, sweep_id="abc", features=[5])
    page = Page(path.read_text(encoding="utf-8"))
    assert page.headings == ["Layer 1, feature 5 (add, positions all) Neuronpedia"]
    (grid,) = page.grids
    assert grid[0] == ["prompt", "seed", "unsteered", "scale 8", "scale 16"]
    assert [row[:2] for row in grid[1:]] == [["Tell me about", "0"], ["Tell me about", "1"],
                                             ["Once upon a time", "0"], ["Once upon a time", "1"]]
    assert grid[4][2] == "p1s1f5x0 concept 0 · NLL 2 · KL 0", "the unsteered generation, its metrics"
    assert grid[4][3] == "p1s1f5x8 concept 0.4 · NLL 2.5 · KL 0.25"
    assert grid[4][4] == "<script>alert(1)</script> concept 0.8 · NLL 3 · KL 0.5", "text, never markup"
    assert "https://www.neuronpedia.org/x/1-res/5" in page.links
    assert page.resources == [], "self-contained: nothing loaded from anywhere"


def test_without_a_choice_the_most_steerable_features_are_shown(records, tmp_path) -> None:
    html = write_report(tmp_path / "report.html", records, sweep_id="abc", top=1).read_text(encoding="utf-8")
    assert Page(html).headings == ["Layer 1, feature 5 (add, positions all) Neuronpedia"]
    assert "the 1 most steerable of 2 curves" in html
    both = Page(write_report(tmp_path / "both.html", records, sweep_id="abc").read_text(encoding="utf-8"))
    assert [heading.split(" (")[0] for heading in both.headings] == ["Layer 1, feature 5", "Layer 1, feature 3"]


def test_a_feature_the_sweep_did_not_steer_is_refused_in_one_line(records, tmp_path) -> None:
    with pytest.raises(ConfigError, match=r"^--feature: 7 is not a feature of this sweep with a finished point "
                                          r"\(allowed: 3, 5\)$"):
        write_report(tmp_path / "report.html", records, sweep_id="abc", features=[7])
    assert not (tmp_path / "report.html").exists()


@pytest.mark.skipif(shutil.which("chromium") is None, reason="Chromium is not installed (apt-get install chromium)")
def test_the_report_renders_in_headless_chromium(records, tmp_path) -> None:
    path = write_report(tmp_path / "report.html", records, sweep_id="abc", features=[5, 3])
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             f"--user-data-dir={tmp_path / 'profile'}", "--window-size=1400,1000"]
    dom = subprocess.run(["chromium", *flags, "--dump-dom", path.as_uri()], capture_output=True, text=True,
                         timeout=120, check=True).stdout
    rendered = Page(dom)
    assert [heading.split(" (")[0] for heading in rendered.headings] == ["Layer 1, feature 5", "Layer 1, feature 3"]
    assert [len(grid) for grid in rendered.grids] == [5, 5] and rendered.resources == []
    subprocess.run(["chromium", *flags, f"--screenshot={tmp_path / 'report.png'}", path.as_uri()],
                   capture_output=True, timeout=120, check=True)
    assert (tmp_path / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
