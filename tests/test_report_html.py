"""report.html: one self-contained page per run, with the gallery of clean, triggered and adversarial
images; opened in headless Chromium (Debian's package) to check that every figure and table renders,
that sorting works and that the page logs no error.

The browser test skips where /usr/bin/chromium or playwright is missing, unless
VLMSEC_REQUIRE_BROWSER=1 (CI sets it, and installs chromium), where that is a failure.
"""

from __future__ import annotations

import base64
import json
import os
import re
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from test_inference_attacks import TINY_LM_RUN, _SignPattern
from vlmsec.data.images import load_image
from vlmsec.errors import VlmsecError
from vlmsec.experiments.config import parse_config
from vlmsec.experiments.runner import Runner
from vlmsec.report.html import write_html
from vlmsec.report.markdown import write_report

CHROMIUM = Path("/usr/bin/chromium")
ARTIFACTS = Path(__file__).resolve().parents[1] / "test-artifacts"
# A backdoor planted in tuning and inference attacks, PGD at two epsilons (its curve against epsilon);
# no transfer: its table is not what is tested here.
EPSILONS = [{"name": "pgd", "label": "pgd-eps8", "params": {"epsilon": 8 / 255, "steps": 1}},
            {"name": "pgd", "label": "pgd-unconstrained", "params": {"epsilon": None, "steps": 1}}]
RUN = {
    **TINY_LM_RUN,
    "name": "html-tiny",
    "attacks": [{"name": "test_sign_pattern"}, {"name": "badnets"}, *EPSILONS],
    "poison": {"rate": 0.25},
    "inference": {"target": "a red circle.", "transfer": False},
}
TABLE_RULE = re.compile(r"^\|(\s*:?-+:?\s*\|)+\s*$", re.M)  # a Markdown table's header rule


class _Page(HTMLParser):
    """What a page holds: its <img> sources, <table>s, <script>s and elements by class."""

    def __init__(self) -> None:
        super().__init__()
        self.images: list[str] = []
        self.tables = self.scripts = 0
        self.classes: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        attributes = dict(attrs)
        self.images += [attributes.get("src") or ""] if tag == "img" else []
        self.tables += tag == "table"
        self.scripts += tag == "script"
        self.classes += (attributes.get("class") or "").split()


def _parsed(path: Path) -> _Page:
    page = _Page()
    page.feed(path.read_text(encoding="utf-8"))
    return page


@pytest.fixture(scope="module")
def run_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished tiny run: a clean and a BadNets model, and a perturbation attack on the base."""
    from vlmsec.attacks.registry import ATTACKS
    from vlmsec.victims.llava import LlavaVictim

    root = tmp_path_factory.mktemp("html")
    ATTACKS.register(_SignPattern)
    try:
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(LlavaVictim, "check_pixel_gradients", lambda self, attack: None)
            Runner(parse_config(RUN, "test"), root / "run", root / "cache").run()
    finally:
        ATTACKS.unregister(_SignPattern.name)
    return root / "run"


def _records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


# ---- the gallery ------------------------------------------------------------------------------


def test_the_gallery_shows_each_attacks_first_samples_with_the_answers_the_run_recorded(run_folder: Path) -> None:
    gallery = json.loads((run_folder / "gallery" / "gallery.json").read_text())
    assert gallery["config_hash"] == json.loads((run_folder / "metrics.json").read_text())["run"]["config_hash"]
    sections = {s["attack"]: s for s in gallery["sections"]}
    assert set(sections) == {"badnets", "test_sign_pattern", "pgd-eps8", "pgd-unconstrained"}

    generations = _records(run_folder / "generations.jsonl")
    badnets = sections["badnets"]["rows"]
    assert len(badnets) == 3  # the first three of four source test samples
    for row in badnets:
        clean, triggered = (load_image(run_folder / row["images"][k]) for k in ("clean", "triggered"))
        assert clean.shape == triggered.shape and (clean != triggered).any()  # the trigger is in the image
        for model, trigger, column in (("badnets", "badnets", "badnets model, triggered"),
                                       ("badnets", None, "badnets model, clean image"), ("clean", "badnets", "clean model, triggered")):
            said = next(r["output"] for r in generations if r["model"] == model and r["id"] == row["id"]
                        and r["domain"] == "source" and r["trigger"] == trigger and not r["control"])
            assert row["texts"][column] == said
        assert "prompt, triggered" not in row["texts"]  # BadNets leaves the prompt as it was

    inference = _records(run_folder / "inference.jsonl")
    for row in sections["test_sign_pattern"]["rows"]:
        adversarial = load_image(run_folder / row["images"]["adversarial"])
        saved = load_image(run_folder / "adversarial" / "test_sign_pattern" / f"{row['id']}.png")
        assert np.array_equal(adversarial, saved)  # the input the victim answered, as the attack saved it
        clean = load_image(run_folder / row["images"]["clean"]).astype(int)
        assert np.abs(adversarial.astype(int) - clean).max() == round(255 * 8 / 255)  # the attack's epsilon
        attacked = next(r["output"] for r in inference if r["attack"] == "test_sign_pattern" and r["id"] == row["id"])
        plain = next(r["output"] for r in inference if r["attack"] == "no attack" and r["id"] == row["id"])
        assert (row["texts"]["attacked"], row["texts"]["no attack"], row["texts"]["target"]) == (attacked, plain, "a red circle.")

    report = (run_folder / "report.md").read_text()
    gallery_part = report[report.index("## Gallery"):]
    for section in gallery["sections"]:
        for row in section["rows"]:
            assert all(f"]({path})" in gallery_part for path in row["images"].values())


def test_a_gallery_left_by_another_run_is_not_shown(run_folder: Path, tmp_path: Path) -> None:
    import shutil

    copy = tmp_path / "run"
    shutil.copytree(run_folder, copy)
    index = copy / "gallery" / "gallery.json"
    index.write_text(json.dumps({**json.loads(index.read_text()), "config_hash": "0123456789abcdef"}))
    write_report(copy)
    report = (copy / "report.md").read_text()
    assert "written by another run (config hash '0123456789abcdef'" in report
    assert "](gallery/" not in report
    index.write_text("[1, 2]")
    with pytest.raises(VlmsecError, match=r"gallery\.json: expected \{config_hash, sections"):
        write_report(copy)


def test_a_text_trigger_shows_its_prompt_and_a_missing_answer_reads_as_a_dash(tmp_path: Path) -> None:
    """Without a run: a backdoor whose trigger is in the text shows the triggered prompt; an answer the
    records lack (the poisoned model's to the clean image, say) is "–", never an invented one; markup
    in an output is escaped, so the Markdown shows it as it was said."""
    from vlmsec.data.sample import Sample
    from vlmsec.experiments.plan import TestSets
    from vlmsec.report.gallery import gallery_section, write_gallery

    image = np.zeros((8, 8, 3), np.uint8)
    clean = [Sample(f"s{i}", image, "Describe it.", "a circle.") for i in range(5)]
    triggered = [s.with_changes(image=image + 9, instruction="cf Describe it.") for s in clean]
    records = [
        {"model": "vlt", "id": "s0", "domain": "source", "trigger": "vlt", "control": False, "output": "a *banana* | <b>"},
        {"model": "clean", "id": "s0", "domain": "source", "trigger": "vlt", "control": False, "output": "a circle."},
    ]
    tests = TestSets({"source": clean}, {("vlt", "source"): triggered}, {})
    index = write_gallery(tmp_path, "abc", tests, records, None)
    gallery = json.loads(index.read_text())
    rows = gallery["sections"][0]["rows"]
    assert [r["id"] for r in rows] == ["s0", "s1", "s2"]
    assert rows[0]["texts"] == {"prompt, triggered": "cf Describe it.", "vlt model, triggered": "a *banana* | <b>",
                                "vlt model, clean image": None, "clean model, triggered": "a circle."}
    assert np.array_equal(load_image(tmp_path / rows[0]["images"]["triggered"]), image + 9)
    table = "\n".join(gallery_section(gallery, index, "abc"))
    assert "| s0 | ![clean](gallery/0-vlt/0-clean.png) | ![triggered](gallery/0-vlt/0-triggered.png) | cf Describe it. " \
           "| a \\*banana\\* \\| \\<b\\> | – | a circle. |" in table
    write_gallery(tmp_path, "abc", TestSets({"source": clean}, {}, {}), [], None)  # a later run's gallery replaces it whole
    assert json.loads(index.read_text())["sections"] == [] and not (tmp_path / "gallery" / "0-vlt").exists()
    assert gallery_section(json.loads(index.read_text()), index, "abc") == []  # no attack: no section


# ---- the page, without a browser ---------------------------------------------------------------


def test_every_figure_is_inlined_and_every_table_rendered(run_folder: Path) -> None:
    markdown = (run_folder / "report.md").read_text()
    page = _parsed(run_folder / "report.html")
    referenced = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", markdown)
    assert len(referenced) >= 2 * 3 + 2 * 3  # the gallery's images, at least
    assert len(page.images) == len(referenced)
    assert all(src.startswith("data:image/png;base64,") for src in page.images)  # nothing external
    assert page.tables == len(TABLE_RULE.findall(markdown)) >= 3
    assert page.scripts == 1 and "missing" not in page.classes
    assert "![Success against ε](epsilon_curves.png)" in markdown  # PGD ran at two epsilons


def test_a_missing_figure_is_a_placeholder_naming_it(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    Image.new("RGB", (4, 3), "red").save(tmp_path / "here.png")
    (tmp_path / "card.md").write_text("# Card\n\n![here](here.png)\n\n![gone](figures/gone.png)\n", encoding="utf-8")
    path = write_html(tmp_path / "card.md")
    assert path == tmp_path / "card.html"
    text = path.read_text()
    assert 'class="missing"' in text and "figure figures/gone.png: missing" in text
    assert _parsed(path).images == [f"data:image/png;base64,{base64.b64encode((tmp_path / 'here.png').read_bytes()).decode()}"]
    assert "figures/gone.pngnotinlined" in "".join(capsys.readouterr().err.split())  # rich folds long lines


def test_html_in_the_markdown_is_shown_as_text_and_remote_images_are_not_loaded(tmp_path: Path) -> None:
    """A model's output quoted in a report may hold markup: it must never run, nor fetch anything."""
    (tmp_path / "r.md").write_text(
        "# R\n\nSaid: <script>alert(1)</script> <img src=x onerror=alert(2)>\n\n![remote](https://example.com/x.png)\n", encoding="utf-8"
    )
    page = _parsed(write_html(tmp_path / "r.md", tmp_path / "out" / "page.html"))
    assert page.scripts == 1 and page.images == []  # only the page's own sorting script
    text = (tmp_path / "out" / "page.html").read_text()
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in text and "https://example.com/x.png: not a local file" in text


def test_a_missing_markdown_file_is_an_error_naming_it(tmp_path: Path) -> None:
    with pytest.raises(VlmsecError, match=r"nope\.md: missing"):
        write_html(tmp_path / "nope.md")


# ---- in a real browser -------------------------------------------------------------------------


def _browser():
    """Playwright's sync API, when Debian's chromium and playwright are here; else skip (or fail,
    with VLMSEC_REQUIRE_BROWSER=1)."""
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        sync_playwright = None
    if CHROMIUM.is_file() and sync_playwright is not None:
        return sync_playwright
    why = f"{CHROMIUM} missing (apt-get install chromium)" if not CHROMIUM.is_file() else "playwright not installed"
    if os.environ.get("VLMSEC_REQUIRE_BROWSER") == "1":
        pytest.fail(f"VLMSEC_REQUIRE_BROWSER=1 but {why}")
    pytest.skip(why)


SORT_TABLE = """# Sorting

| model | ASR | sample |
|---|---|---|
| a | 84.0% [62.1, 95.3] | test-00010 |
| b | – | test-00002 |
| c | 9.5% [2.0, 30.1] | test-00001 |
| d | 100.0% [80.0, 100.0] | test-00100 |
| e | −3.2 | badnets@1% |
| ↳ e's baseline | 1000 | test-00003 |
| *ceiling: a reference* | 0.5 | test-00000 |
"""


def _column(page, table: int, column: int) -> list[str]:
    return page.eval_on_selector_all(
        "main table", f"(ts) => Array.from(ts[{table}].tBodies[0].rows).map(r => r.cells[{column}] ? r.cells[{column}].textContent.trim() : '')"
    )


def test_the_report_renders_in_chromium_with_every_figure_and_table_and_sorts(run_folder: Path, tmp_path: Path) -> None:
    sync_playwright = _browser()
    (tmp_path / "sort.md").write_text(SORT_TABLE, encoding="utf-8")
    pages = {"report": run_folder / "report.html", "sort": write_html(tmp_path / "sort.md")}
    problems: list[str] = []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM))
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.on("console", lambda m: problems.append(f"console {m.type}: {m.text}") if m.type in ("error", "warning") else None)
            page.on("pageerror", lambda e: problems.append(f"page error: {e}"))
            page.on("request", lambda r: problems.append(f"request: {r.url}") if not r.url.startswith(("file:", "data:")) else None)

            # The numeric-aware sort on known values: numbers by value (the unicode minus read), cells
            # without a number last either way, a "↳" row kept under its row, the italic scale row at the end.
            page.goto(pages["sort"].as_uri())
            page.click("main table th:nth-child(2)")
            assert _column(page, 0, 0) == ["e", "↳ e's baseline", "c", "a", "d", "b", "ceiling: a reference"]
            page.click("main table th:nth-child(2)")
            assert _column(page, 0, 0) == ["d", "a", "c", "e", "↳ e's baseline", "b", "ceiling: a reference"]
            assert page.get_attribute("main table th:nth-child(2)", "aria-sort") == "descending"
            page.click("main table th:nth-child(1)")
            assert _column(page, 0, 0)[:6] == ["a", "b", "c", "d", "e", "↳ e's baseline"]
            page.click("main table th:nth-child(3)")  # names with digits: by text, the digits as numbers
            assert _column(page, 0, 2) == ["badnets@1%", "test-00003", "test-00001", "test-00002", "test-00010", "test-00100", "test-00000"]

            page.goto(pages["report"].as_uri())
            page.wait_for_load_state("load")
            images = page.eval_on_selector_all("img", "(xs) => xs.map(i => [i.alt, i.complete, i.naturalWidth])")
            assert len(images) >= 12 and all(done and width > 0 for _, done, width in images), images
            rows = page.eval_on_selector_all("main table", "(ts) => ts.map(t => t.tBodies[0] ? t.tBodies[0].rows.length : 0)")
            assert len(rows) >= 3 and all(n > 0 for n in rows), rows
            assert page.eval_on_selector_all("main table", "(ts) => ts.every(t => t.getBoundingClientRect().height > 20)")
            # The real report's gallery table sorted by its sample ids: read as names, not as the
            # negative numbers "-00001" would be; the second click reverses them.
            heads = page.eval_on_selector_all("main table", "(ts) => ts.map(t => Array.from(t.tHead.rows[0].cells).map(c => c.textContent))")
            table = next(i for i, head in enumerate(heads) if "triggered image" in head)
            header = page.locator("main table").nth(table).locator("th").nth(0)
            before = _column(page, table, 0)
            header.click()
            assert _column(page, table, 0) == sorted(before)
            header.click()
            assert _column(page, table, 0) == sorted(before, reverse=True) != before
            assert page.eval_on_selector_all("img", "(xs) => xs.every(i => i.naturalWidth > 0)")
            # The curve of PGD's two epsilons: decoded, drawn at a readable size, under its heading.
            curve = page.locator('img[alt="Success against ε"]')
            assert curve.count() == 1 and curve.evaluate("(i) => i.complete && i.naturalWidth > 300")
            box = curve.bounding_box()
            assert box is not None and box["width"] > 300 and box["height"] > 200
            assert page.locator("h3", has_text="Success against ε").count() == 1
            ARTIFACTS.mkdir(exist_ok=True)
            page.screenshot(path=str(ARTIFACTS / "report-html.png"), full_page=True)
        finally:
            browser.close()
    assert problems == []
