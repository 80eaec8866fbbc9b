"""report.html from any Markdown file vlmsec writes: one self-contained page to read in a browser.

The page carries everything it shows: the figures the Markdown references are inlined as base64
data URLs, the style and a small script (click a column header to sort; numeric-aware, so
"84.0% [62.1, 95.3]" sorts by 84) are inline, and a Content-Security-Policy forbids loading
anything else. The Markdown's raw HTML is not passed through (a model's output quoted in a report
is shown as text, never run), and a figure that is missing, outside the file system or not an
image is drawn as a visible placeholder naming it, so the rest of the report still reads.
"""

from __future__ import annotations

import base64
import html
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any
from urllib.parse import unquote

from markdown_it import MarkdownIt
from markdown_it.token import Token

from vlmsec.artifacts import write_text_atomic
from vlmsec.errors import VlmsecError
from vlmsec.progress import console

IMAGE_TYPES = {".png": "image/png", ".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".gif": "image/gif", ".webp": "image/webp"}
TOC_LEVELS = (2, 3)  # headings listed in the table of contents (h1 is the page title)
# Nothing but what the page holds: inline style and script, images as data URLs.
POLICY = "default-src 'none'; img-src data:; style-src 'unsafe-inline'; script-src 'unsafe-inline'"

STYLE = """
:root { --fg: #1d2433; --muted: #5b6478; --line: #d9dee8; --band: #f5f7fb; --accent: #2f5fb3; }
* { box-sizing: border-box; }
body { margin: 0; color: var(--fg); background: #fff; font: 15px/1.55 system-ui, -apple-system, "Segoe UI", Roboto,
  "Noto Sans", "DejaVu Sans", sans-serif; }
.page { display: grid; grid-template-columns: minmax(0, 1fr); max-width: 1500px; margin: 0 auto; }
@media (min-width: 1100px) { .page { grid-template-columns: 250px minmax(0, 1fr); } nav.toc { position: sticky; top: 0;
  height: 100vh; overflow-y: auto; border-right: 1px solid var(--line); } }
nav.toc { padding: 1.2rem 1rem; font-size: 13px; background: var(--band); }
nav.toc h2 { font-size: 12px; text-transform: uppercase; letter-spacing: .06em; color: var(--muted); margin: 0 0 .5rem; }
nav.toc ul { list-style: none; padding-left: 0; margin: 0; } nav.toc ul ul { padding-left: 1rem; }
nav.toc li { margin: .25rem 0; } nav.toc a { color: var(--fg); text-decoration: none; } nav.toc a:hover { color: var(--accent); }
main { padding: 1.5rem 2rem 3rem; min-width: 0; }
h1 { font-size: 1.7rem; margin: .2rem 0 1rem; }
h2 { font-size: 1.25rem; margin: 2.2rem 0 .7rem; padding-bottom: .3rem; border-bottom: 1px solid var(--line); }
h3 { font-size: 1.05rem; margin: 1.6rem 0 .5rem; }
a { color: var(--accent); }
code { font: 13px/1.4 ui-monospace, "DejaVu Sans Mono", monospace; background: var(--band); padding: .05rem .3rem; border-radius: 3px; }
blockquote { margin: .8rem 0; padding: .4rem 1rem; border-left: 4px solid #e0a526; background: #fff8e6; }
.table-wrap { overflow-x: auto; margin: .8rem 0 1.2rem; border: 1px solid var(--line); border-radius: 6px; }
table { border-collapse: collapse; font-size: 13.5px; min-width: 100%; }
th, td { padding: .4rem .65rem; border-bottom: 1px solid var(--line); vertical-align: top; text-align: left; }
td { font-variant-numeric: tabular-nums; } td:first-child { min-width: 9em; } td.num { white-space: nowrap; }
tbody tr:nth-child(even) { background: var(--band); } tbody tr:hover { background: #e9effa; }
th { position: sticky; top: 0; background: #e8ecf4; font-weight: 600; white-space: nowrap; cursor: pointer; user-select: none; }
th::after { content: " \\2195"; color: #9aa3b5; font-weight: 400; }
th[aria-sort="ascending"]::after { content: " \\2191"; color: var(--accent); }
th[aria-sort="descending"]::after { content: " \\2193"; color: var(--accent); }
main > p > img, main img.figure { display: block; max-width: min(100%, 900px); height: auto; margin: 1rem 0;
  border: 1px solid var(--line); border-radius: 4px; }
td img { width: 112px; height: auto; image-rendering: pixelated; border: 1px solid var(--line); border-radius: 3px; }
.missing { display: inline-block; padding: .6rem .9rem; border: 2px dashed #c0392b; color: #c0392b; background: #fdf1f0;
  border-radius: 4px; font-size: 13px; }
footer { margin-top: 3rem; color: var(--muted); font-size: 12px; }
"""

# Click a header to sort its table by that column (again: the other way). A cell's key is the first
# number that starts it or a word in it ("84.0% [62.1, 95.3]" -> 84, "−0.3" -> -0.3, "1,998,912";
# not the digits of a name such as "test-00001" or "badnets@1%"); cells without one ("–", "not
# measured", names) sort after those with one, by text with digits read as numbers.
# A row whose first cell begins with "↳" (a baseline under its attack) moves with the row above it. Rows whose first cell is all emphasis (a table's scale
# rows: ceiling, agreement, blind) are notes and stay at the end.
SCRIPT = r"""
(function () {
  "use strict";
  function key(cell) {
    var text = cell.textContent.trim();
    var plain = text.replace(/\u2212/g, "-").replace(/(\d),(?=\d{3}\b)/g, "$1");
    var m = plain.match(/(?:^|[\s(\[=:])([-+]?\d+(?:\.\d+)?(?:e[-+]?\d+)?)/i);
    return { num: m ? parseFloat(m[1]) : null, text: text };
  }
  function compare(a, b) {
    if (a.num !== null && b.num !== null) return a.num - b.num;
    if (a.num !== null) return -1;
    if (b.num !== null) return 1;
    return a.text.localeCompare(b.text, undefined, { numeric: true });
  }
  function pinned(row) {
    var first = row.cells[0];
    return !!first && first.children.length === 1 && first.children[0].tagName === "EM" &&
      first.textContent.trim() === first.children[0].textContent.trim();
  }
  function sortBy(table, column, th) {
    var body = table.tBodies[0];
    if (!body) return;
    var descending = th.getAttribute("aria-sort") === "ascending";
    var rows = Array.prototype.slice.call(body.rows);
    var notes = rows.filter(pinned);
    var sorted = [];  // groups: a row, and the rows under it that begin with "\u21b3" (its baselines)
    rows.filter(function (r) { return !pinned(r); }).forEach(function (r) {
      var under = sorted.length && r.cells[0] && r.cells[0].textContent.trim().charAt(0) === "\u21b3";
      if (under) sorted[sorted.length - 1].rows.push(r);
      else sorted.push({ rows: [r], key: key(r.cells[column] || r.insertCell()) });
    });
    sorted.sort(function (a, b) {
      var order = compare(a.key, b.key);
      if (descending) order = -order;
      if (a.key.num === null || b.key.num === null) {  // cells without a number stay last either way
        if ((a.key.num === null) !== (b.key.num === null)) order = a.key.num === null ? 1 : -1;
      }
      return order;
    });
    sorted.forEach(function (s) { s.rows.forEach(function (r) { body.appendChild(r); }); });
    notes.forEach(function (r) { body.appendChild(r); });
    Array.prototype.forEach.call(table.tHead.rows[0].cells, function (h) { h.removeAttribute("aria-sort"); });
    th.setAttribute("aria-sort", descending ? "descending" : "ascending");
  }
  Array.prototype.forEach.call(document.querySelectorAll("main td"), function (cell) {
    if (key(cell).num !== null && cell.textContent.length < 40) cell.classList.add("num");  // a rate stays on one line
  });
  Array.prototype.forEach.call(document.querySelectorAll("main table"), function (table) {
    if (!table.tHead || !table.tHead.rows.length) return;
    Array.prototype.forEach.call(table.tHead.rows[0].cells, function (th, column) {
      th.title = "Sort by this column";
      th.tabIndex = 0;
      th.addEventListener("click", function () { sortBy(table, column, th); });
      th.addEventListener("keydown", function (e) {
        if (e.key === "Enter" || e.key === " ") { e.preventDefault(); sortBy(table, column, th); }
      });
    });
  });
})();
"""


def _parser() -> MarkdownIt:
    """CommonMark with tables; raw HTML in the Markdown is shown as text, never passed through."""
    md = MarkdownIt("commonmark", {"html": False}).enable("table")
    md.add_render_rule("table_open", lambda self, tokens, idx, options, env: '<div class="table-wrap"><table>\n')
    md.add_render_rule("table_close", lambda self, tokens, idx, options, env: "</table></div>\n")
    md.add_render_rule("image", _render_image)
    return md


def _render_image(self: Any, tokens: Sequence[Token], idx: int, options: Any, env: dict[str, Any]) -> str:
    """An image as a data URL, or a placeholder naming the file where it cannot be inlined."""
    token = tokens[idx]
    alt = self.renderInlineAsText(token.children or [], options, env)
    src = str(token.attrGet("src") or "")
    data, problem = _inline(src, env["folder"])
    if problem is not None:
        env["missing"].append(src)
        return f'<span class="missing" role="img" aria-label="{html.escape(alt)}">figure {html.escape(src)}: {html.escape(problem)}</span>'
    title = token.attrGet("title")
    extra = f' title="{html.escape(str(title))}"' if title else ""
    return f'<img src="{html.escape(data)}" alt="{html.escape(alt)}"{extra}>'


def _inline(src: str, folder: Path) -> tuple[str, str | None]:
    """(data URL, None) for a local image file `src` (relative to `folder`), else ("", why not)."""
    if src.startswith("data:"):
        return src, None
    if re.match(r"^[A-Za-z][A-Za-z0-9+.-]*:", src):
        return "", "not a local file (the page loads nothing from elsewhere)"
    path = folder / unquote(src)  # markdown-it percent-encodes what a URL may not hold
    mime = IMAGE_TYPES.get(path.suffix.lower())
    if mime is None:
        return "", f"not an image file vlmsec inlines ({', '.join(IMAGE_TYPES)})"
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return "", "missing"
    except OSError as err:
        return "", f"cannot read: {err.strerror or err}"
    return f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}", None


def _heading_text(inline: Token) -> str:
    """A heading's plain text (its markup dropped)."""
    return "".join(c.content for c in inline.children or [] if c.type in ("text", "code_inline")).strip()


def _anchor(text: str, taken: set[str]) -> str:
    """A unique id for a heading: lower case, runs of other characters as '-'."""
    base = re.sub(r"[^\w]+", "-", text.lower()).strip("-") or "section"
    anchor, n = base, 2
    while anchor in taken:
        anchor, n = f"{base}-{n}", n + 1
    taken.add(anchor)
    return anchor


def _contents(tokens: Sequence[Token]) -> tuple[str, list[tuple[int, str, str]]]:
    """Give every heading an id; return the first h1's text (the page title) and the headings to list."""
    title, listed, taken = "", [], set()
    for i, token in enumerate(tokens):
        if token.type != "heading_open":
            continue
        text = _heading_text(tokens[i + 1])
        token.attrSet("id", _anchor(text, taken))
        level = int(token.tag[1])
        if level == 1 and not title:
            title = text
        if level in TOC_LEVELS:
            listed.append((level, str(token.attrGet("id")), text))
    return title, listed


def _toc(headings: list[tuple[int, str, str]]) -> str:
    """The table of contents as nested lists (each h3 under the h2 before it)."""
    if not headings:
        return ""
    groups: list[tuple[str, list[str]]] = []
    for level, anchor, text in headings:
        link = f'<a href="#{anchor}">{html.escape(text)}</a>'
        if level == TOC_LEVELS[0] or not groups:
            groups.append((link, []))
        else:
            groups[-1][1].append(link)
    items = "".join(
        f"<li>{link}" + (f"<ul>{''.join(f'<li>{s}</li>' for s in subs)}</ul>" if subs else "") + "</li>" for link, subs in groups
    )
    return f'<nav class="toc" aria-label="Contents"><h2>Contents</h2><ul>{items}</ul></nav>'


def render_html(markdown: str, folder: Path, source: str = "report.md") -> tuple[str, list[str]]:
    """The page for `markdown` (images relative to `folder`), and the image sources it could not inline."""
    md = _parser()
    env: dict[str, Any] = {"folder": folder, "missing": []}
    tokens = md.parse(markdown, env)
    title, headings = _contents(tokens)
    body = md.renderer.render(tokens, md.options, env)
    page = f"""<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta http-equiv="Content-Security-Policy" content="{POLICY}">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{html.escape(title or source)}</title>
<style>{STYLE}</style>
</head>
<body>
<div class="page">
{_toc(headings)}
<main>
{body}
<footer>Rendered by vlmsec from {html.escape(source)}; click a column header to sort the table by it.</footer>
</main>
</div>
<script>{SCRIPT}</script>
</body>
</html>
"""
    return page, env["missing"]


def write_html(markdown_path: str | Path, html_path: str | Path | None = None) -> Path:
    """Write the Markdown file `markdown_path` as one self-contained HTML page (default: the same
    name with .html, beside it), atomically; return its path. Figures it cannot inline are drawn
    as placeholders naming them (see the module docstring)."""
    markdown_path = Path(markdown_path)
    target = Path(html_path) if html_path is not None else markdown_path.with_suffix(".html")
    try:
        markdown = markdown_path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise VlmsecError(f"{markdown_path}: missing; nothing to render as HTML") from None
    except (OSError, UnicodeDecodeError) as err:
        raise VlmsecError(f"{markdown_path}: cannot read: {err}") from None
    page, missing = render_html(markdown, markdown_path.parent, markdown_path.name)
    for src in missing:
        console.print(f"{target}: figure {src} not inlined (see its placeholder on the page)")
    write_text_atomic(target, page)
    return target
