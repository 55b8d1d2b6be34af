"""Release metadata stays in step: the version has one home, ``anyfork.__version__``, which
the installed distribution reports and the changelog records; the LICENSE file is the license
the metadata declares (``nox -s build`` checks the built sdist and wheel themselves)."""

from __future__ import annotations

import importlib.metadata
import re
from pathlib import Path

import anyfork

ROOT = Path(__file__).parent.parent


def test_version_is_the_installed_distributions_version() -> None:
    assert anyfork.__version__ == importlib.metadata.version("anyfork")


def test_version_is_written_in_one_place() -> None:
    pyproject = (ROOT / "pyproject.toml").read_text()
    project = pyproject.split("\n[project]\n", 1)[1].split("\n[", 1)[0]
    assert re.search(r'^dynamic = \[.*"version".*\]$', project, re.MULTILINE)
    assert not re.search(r"^version\s*=", project, re.MULTILINE)
    assert '\n[tool.hatch.version]\npath = "src/anyfork/__init__.py"\n' in pyproject
    init = (ROOT / "src" / "anyfork" / "__init__.py").read_text()
    assert len(re.findall(r"^__version__ = ", init, re.MULTILINE)) == 1


def test_changelog_has_an_entry_for_the_current_version() -> None:
    changelog = (ROOT / "CHANGELOG.md").read_text()
    assert "## [Unreleased]" in changelog
    assert re.search(
        rf"^## \[{re.escape(anyfork.__version__)}\] - \d{{4}}-\d\d-\d\d$", changelog, re.M
    )


def test_license_file_matches_the_declared_license_and_authors() -> None:
    pyproject = (ROOT / "pyproject.toml").read_text()
    assert 'license = "MIT"' in pyproject
    assert 'license-files = ["LICENSE"]' in pyproject
    license_text = (ROOT / "LICENSE").read_text()
    assert license_text.startswith("MIT License\n")
    holder = re.search(r'authors = \[\{ name = "([^"]+)" \}\]', pyproject)
    assert holder is not None
    assert f"Copyright (c) 2026 {holder.group(1)}\n" in license_text


def test_ci_builds_and_smoke_tests_the_distributions() -> None:
    noxfile = (ROOT / "noxfile.py").read_text()
    assert '"build"' in noxfile.split("nox.options.sessions =", 1)[1].split("]", 1)[0]
    assert "def build(session" in noxfile
    assert (ROOT / "tests" / "smoke_installed.py").is_file()
