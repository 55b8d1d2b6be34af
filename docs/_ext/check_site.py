"""Fail on reST that reached the built site as text: ``python docs/_ext/check_site.py site``.

``nox -s docs`` runs it after ``mkdocs build --strict``. It reads every page's HTML and reports

- a Sphinx role shown as text (":class:" followed by the code it should have linked);
- a reST literal-block marker or directive shown as text ("Example::", ".. versionadded::");
- a code block inside a row of a Parameters/Returns/Raises table: in a docstring, an example
  written after the field list that was taken into the last field.

Code in the site (``<code>``, ``<pre>``) is never flagged: a page may show reST as an example.
docs/_ext/sphinx_docstrings.py turns the reST of anyfork's docstrings into what the site needs;
a problem reported here is reST that it does not handle, or a docstring it cannot fix (an
example inside a field: move it after the fields).
"""

from __future__ import annotations

import re
import sys
from html.parser import HTMLParser
from pathlib import Path

CODE = "\x00"  # stands for a code element in the text outside code
ROLE = re.compile(r":(?:[a-z]+:)?[a-z]+:(?=\x00|`)")
LITERAL_MARKER = re.compile(r"(?<!\.\. )(?<![\w-])[\w-]*\w::(?=\s|\x00|$)")  # not a directive
DIRECTIVE = re.compile(r"\.\. [a-z][a-z-]*::")
# Elements with no end tag, and elements that start a new line of text.
VOID = frozenset(
    {"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "source", "wbr"}
)
BLOCK_BREAK = frozenset(
    {"p", "div", "li", "dt", "dd", "td", "th", "tr", "table", "pre", "h1", "h2", "h3", "h4", "h5"}
)


class _Page(HTMLParser):
    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.text: list[str] = []  # the text outside code, code elements as CODE
        self.codes: list[str] = []  # the text of each of those code elements, in order
        self.code_depth = 0
        self.skip_depth = 0  # <script> and <style>
        self.open: list[tuple[str, bool]] = []  # (tag, starts a docstring table row)
        self.rows_with_code: list[str] = []
        self.row_depth = 0
        self.row_text: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag in VOID:
            return
        classes = (dict(attrs).get("class") or "").split()
        is_row = "doc-section-item" in classes
        self.open.append((tag, is_row))
        self.row_depth += is_row
        if tag in ("script", "style"):
            self.skip_depth += 1
        elif tag in ("code", "pre"):
            if self.code_depth == 0:
                self.text.append(CODE)
                self.codes.append("")
            self.code_depth += 1
            if tag == "pre" and self.row_depth:
                self.rows_with_code.append(" ".join("".join(self.row_text).split())[:120])
        elif tag in BLOCK_BREAK:
            self.text.append("\n")

    def handle_endtag(self, tag: str) -> None:
        if tag in VOID or not any(name == tag for name, _ in self.open):
            return
        while self.open:  # close what the tag closes, as browsers do
            name, is_row = self.open.pop()
            self.row_depth -= is_row
            if not self.row_depth:
                self.row_text.clear()
            if name in ("script", "style"):
                self.skip_depth -= 1
            elif name in ("code", "pre"):
                self.code_depth -= 1
            if name == tag:
                break
        if tag in BLOCK_BREAK:
            self.text.append("\n")

    def handle_data(self, data: str) -> None:
        if self.row_depth:
            self.row_text.append(data)
        if self.skip_depth:
            return
        if self.code_depth:
            self.codes[-1] += data
        else:
            self.text.append(data)

    def quote(self, text: str, start: int, end: int) -> str:
        """``text[start:end]`` on one line, with its code shown between backticks."""
        code = iter(self.codes[text.count(CODE, 0, start) :])
        shown = "".join(f"`{_cut(next(code))}`" if c == CODE else c for c in text[start:end])
        return " ".join(shown.split())


def _cut(code: str) -> str:
    return code if len(code) <= 40 else f"{code[:39]}…"


def problems_in_html(html: str) -> list[str]:
    """What of the page is reST shown as text, or an example taken into a field."""
    page = _Page()
    page.feed(html)
    page.close()
    text = "".join(page.text)
    problems: list[str] = []
    for kind, pattern in (
        ("Sphinx role shown as text", ROLE),
        ("reST literal-block marker shown as text", LITERAL_MARKER),
        ("reST directive shown as text", DIRECTIVE),
    ):
        for match in pattern.finditer(text):
            context = page.quote(text, max(0, match.start() - 50), match.end() + 30)
            problems.append(f"{kind}: {context!r}")
    for row in page.rows_with_code:
        problems.append(f"code block in a docstring table row (an example in a field?): {row!r}")
    return problems


def problems_in_site(site: Path) -> list[str]:
    problems: list[str] = []
    for page in sorted(site.rglob("*.html")):
        for problem in problems_in_html(page.read_text(encoding="utf-8")):
            problems.append(f"{page.relative_to(site)}: {problem}")
    return problems


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print(f"usage: {argv[0]} SITE_DIR", file=sys.stderr)
        return 2
    site = Path(argv[1])
    pages = sorted(site.rglob("*.html"))
    if not pages:
        print(f"check_site: no HTML pages under {site}: build the site first", file=sys.stderr)
        return 2
    problems = problems_in_site(site)
    for problem in problems:
        print(problem, file=sys.stderr)
    if problems:
        print(
            f"check_site: {len(problems)} problem(s) in {site}; see docs/_ext/check_site.py",
            file=sys.stderr,
        )
        return 1
    print(f"check_site: {len(pages)} pages, no reST shown as text")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
