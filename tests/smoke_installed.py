"""Smoke test of an installed anyfork: ``nox -s build`` runs it with a fresh venv's Python
that has only the built wheel installed, from a directory outside the source tree.

Usage: python smoke_installed.py EXPECTED_VERSION
"""

from __future__ import annotations

import importlib.metadata
import sys
from pathlib import Path

import anyio

import anyfork


def double(x: int) -> int:  # sync: a worker thread
    return 2 * x


async def triple(x: int) -> int:  # coroutine: a task
    await anyio.sleep(0)
    return 3 * x


async def in_a_scope() -> tuple[int, int]:
    async with anyfork.scope():
        doubled = anyfork.fork(double, 5)
        tripled = anyfork.fork(triple, 5)
        return await doubled, await tripled


def main() -> None:
    expected_version = sys.argv[1]
    package = Path(anyfork.__file__).parent
    assert "site-packages" in package.parts, f"anyfork imported from {package}, not the wheel"
    assert (package / "py.typed").is_file(), "the wheel has no py.typed marker"
    assert anyfork.__version__ == expected_version, anyfork.__version__
    assert importlib.metadata.version("anyfork") == expected_version

    # A script with no event loop: a worker thread and the background loop.
    doubled, tripled = anyfork.fork(double, 21), anyfork.fork(triple, 14)
    assert anyfork.wait(doubled) == 42
    assert tripled.wait(timeout=30) == 42
    # Async code: a task and a worker thread in a scope, on asyncio.
    assert anyio.run(in_a_scope) == (10, 15)
    print(f"smoke: anyfork {anyfork.__version__} from {package}: ok")


if __name__ == "__main__":
    main()
