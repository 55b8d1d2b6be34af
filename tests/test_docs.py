"""Every Python example in the README and the docs, and every program in examples/, runs.

An example fenced as ```python runs as a program. One fenced as ```python title="Cell N"
is a notebook cell: the cells of a page are one notebook, run in order in a stand-in
kernel (tests/notebook_kernel.py), so they may ``await`` at the top level as in Jupyter.
"""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from .conftest import run_notebook_cells, without_slow_steps_under_the_bound

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"^```python\n(.*?)^```", re.DOTALL | re.MULTILINE)
CELL = re.compile(r'^```python title="Cell (\d+)"\n(.*?)^```', re.DOTALL | re.MULTILINE)
# What an example imports -> the package it then needs. torch is installed only where its CPU
# wheel is on disk (Python 3.11, by nox), ray only on 3.11; fastapi and distributed
# (anyfork.dask) are not installed on free-threaded Python (see NOT_FREE_THREADED in
# noxfile.py).
OPTIONAL_PACKAGES = {"torch": "torch", "fastapi": "fastapi", "dask": "distributed", "ray": "ray"}


def _skip_without_optional_packages(source: str) -> None:
    for imported, package in OPTIONAL_PACKAGES.items():
        needs = re.search(rf"^\s*(import|from) ([\w.]+\.)?{imported}\b", source, re.MULTILINE)
        if needs and importlib.util.find_spec(package) is None:
            pytest.skip(f"needs {package}, which is not installed for this Python")


def _blocks() -> list[object]:
    params = []
    for page in PAGES:
        for index, match in enumerate(FENCE.finditer(page.read_text())):
            params.append(pytest.param(match.group(1), id=f"{page.relative_to(ROOT)}[{index}]"))
    return params


def _notebooks() -> list[object]:
    params = []
    for page in PAGES:
        cells = [match.group(2) for match in CELL.finditer(page.read_text())]
        if cells:
            params.append(pytest.param(cells, id=f"{page.relative_to(ROOT)}[cells]"))
    return params


def _run(args: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-X", "dev", "-W", "error", *args],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
    )


@pytest.mark.timeout(90)
@pytest.mark.parametrize("source", _blocks())
def test_docs_example_runs(source: str) -> None:
    _skip_without_optional_packages(source)
    result = _run(["-c", source])
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr, result.stderr


@pytest.mark.timeout(90)
@pytest.mark.parametrize("cells", _notebooks())
def test_docs_notebook_cells_run_in_order(cells: list[str]) -> None:
    _skip_without_optional_packages("".join(cells))
    result = run_notebook_cells(cells)
    assert result.returncode == 0, result.stderr
    # Cells that block the loop for a while (as notebooks do) are let through.
    assert without_slow_steps_under_the_bound(result.stderr) == ""


@pytest.mark.timeout(90)
@pytest.mark.parametrize("example", sorted((ROOT / "examples").glob("*.py")), ids=lambda p: p.name)
def test_example_program_runs(example: Path) -> None:
    source = example.read_text()
    _skip_without_optional_packages(source)
    # Every example runs in dev mode, the torch one too: asyncio's debug mode records a stack
    # at every task it creates, which under torch's busy threads made steps slow, not blocking.
    result = _run([str(example)])
    assert result.returncode == 0, result.stderr
    assert without_slow_steps_under_the_bound(result.stderr) == ""


def test_only_slow_steps_under_the_bound_are_let_through() -> None:
    step = (
        "Executing <Task pending name='Task-2' coro=<main() running at x.py:3>> took {} seconds\n"
    )
    assert without_slow_steps_under_the_bound(step.format("0.142")) == ""
    assert without_slow_steps_under_the_bound(step.format("1.500")) == step.format("1.500")
    assert without_slow_steps_under_the_bound("Traceback (most recent call last):\n") != ""


def test_docs_have_examples_to_run() -> None:
    assert len(_blocks()) >= 10
    assert _notebooks()


@pytest.mark.parametrize("page", PAGES, ids=lambda page: str(page.relative_to(ROOT)))
def test_every_python_example_is_run(page: Path) -> None:
    text = page.read_text()
    fences = re.findall(r"^```python.*$", text, re.MULTILINE)
    programs, cells = FENCE.findall(text), CELL.findall(text)
    assert len(fences) == len(programs) + len(cells), "a ```python fence neither test runs"
    # Numbered from 1 in page order: what a reader runs is what the test runs.
    assert [int(number) for number, _ in cells] == list(range(1, len(cells) + 1))


def test_ci_runs_the_readme_test_command_verbatim() -> None:
    readme = (ROOT / "README.md").read_text()
    commands = re.findall(r"^```bash\n(.*?)\n```", readme, re.DOTALL | re.MULTILINE)
    assert len(commands) == 2, "the Quickstart has exactly two commands"
    demo, test = commands
    assert demo.endswith("nox -s demo")
    assert test in (ROOT / ".ci" / "run").read_text().splitlines()


def _site_check() -> Any:
    # docs/_ext is build tooling, not a package: load the check (stdlib only) from its file.
    spec = importlib.util.spec_from_file_location("check_site", ROOT / "docs/_ext/check_site.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


FIELD_ROW = (
    '<table><tbody><tr class="doc-section-item"><td><code>ShutdownError</code></td>'
    '<td><div class="doc-md-description"><p>if called at exit</p>{}</div></td></tr>'
    "</tbody></table>"
)


@pytest.mark.parametrize(
    ("html", "problem"),
    [
        ("<p>return a :class:<code>Future</code> at once</p>", "Sphinx role shown as text"),
        ("<p>see :py:meth:<code>Future.wait</code></p>", "Sphinx role shown as text"),
        ("<p>as with :mod:`contextvars`</p>", "Sphinx role shown as text"),
        ("<p>Example::</p><pre><code>fork(f)</code></pre>", "literal-block marker"),
        ("<p>.. versionadded:: 0.2</p>", "reST directive shown as text"),
        (
            FIELD_ROW.format('<div class="highlight"><pre><code>fork(f)</code></pre></div>'),
            "code block in a docstring table row",
        ),
    ],
    ids=["role", "domain-role", "role-backticks", "literal-block", "directive", "field-example"],
)
def test_the_site_check_reports_rest_shown_as_text(html: str, problem: str) -> None:
    problems = _site_check().problems_in_html(html)
    assert len(problems) == 1, problems
    assert problem in problems[0]


def test_the_site_check_passes_links_code_and_rest_shown_as_code() -> None:
    html = (
        '<p>return a <a class="autorefs" href="#anyfork.Future"><code>Future</code></a>,'
        ' as with <span title="contextvars"><code>contextvars</code></span>.</p>'
        "<p>Write <code>:class:`Future`</code> in a docstring; <code>Example::</code> too.</p>"
        "<pre><code>.. versionadded:: 0.2\nExample::</code></pre>"
        "<p>Note: fields end at a blank line; std::vector is C++.</p>"
        "<script>var role = ':class:`x`';</script>"
        + FIELD_ROW.format("<p>and <code>fork</code> inline</p>")
    )
    assert _site_check().problems_in_html(html) == []


def test_the_docs_session_checks_the_built_site() -> None:
    docs_session = (ROOT / "noxfile.py").read_text().split("def docs(", 1)[1].split("@nox", 1)[0]
    assert '"--strict"' in docs_session
    assert '"check_site.py"' in docs_session
    mkdocs = (ROOT / "mkdocs.yml").read_text()
    assert "- docs/_ext/sphinx_docstrings.py" in mkdocs
