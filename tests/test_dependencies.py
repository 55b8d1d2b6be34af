"""The dependency floors are honest: anyfork checks at import what it needs of anyio, and
the floor declared in pyproject.toml is the one it checks (``nox -s tests_lowest`` runs
the whole suite at the lowest allowed versions)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from .conftest import run_script

ROOT = Path(__file__).parent.parent


def test_an_anyio_without_what_anyfork_needs_fails_at_import_naming_the_fix() -> None:
    result = run_script(
        """
        from anyio._backends._asyncio import AsyncIOBackend
        from anyio.abc import AsyncBackend
        del AsyncIOBackend.run_sync_soon, AsyncBackend.run_sync_soon  # as on anyio 4.15
        try:
            import anyfork
        except ImportError as exc:
            print(exc)
        """
    )
    assert result.returncode == 0, result.stderr
    assert "anyfork needs anyio >= 4.16" in result.stdout
    assert "pip install 'anyio>=4.16'" in result.stdout


def test_the_declared_anyio_floor_is_the_one_checked_at_import() -> None:
    pyproject = (ROOT / "pyproject.toml").read_text()
    dependencies = pyproject.split("dependencies = [", 1)[1].split("]", 1)[0]
    assert re.findall(r'"(anyio[^"]*)"', dependencies) == ["anyio>=4.16"]
    source = (ROOT / "src" / "anyfork" / "_loops.py").read_text()
    assert re.search(r"anyio >= 4\.16", source)


def default_sessions() -> str:
    """The text of the list of sessions a bare ``nox`` runs (CI runs that)."""
    noxfile = (ROOT / "noxfile.py").read_text()
    return noxfile.split("nox.options.sessions =", 1)[1].split("]", 1)[0]


@pytest.mark.parametrize("session", ["tests_lowest"])
def test_ci_runs_the_lowest_versions_session(session: str) -> None:
    assert f'"{session}"' in default_sessions()
    assert '"--resolution", "lowest-direct"' in (ROOT / "noxfile.py").read_text()


def test_ci_runs_the_tests_on_free_threaded_python_with_the_gil_off() -> None:
    assert '"tests_freethreaded"' in default_sessions()
    assert '{"PYTHON_GIL": "0"}' in (ROOT / "noxfile.py").read_text()
