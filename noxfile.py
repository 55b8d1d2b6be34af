"""Development sessions: ``nox`` runs tests, lint, typecheck and docs; see README."""

from __future__ import annotations

import glob
import os
import shutil
from pathlib import Path

import nox

ROOT = Path(__file__).parent
PYTHONS = ["3.10", "3.11", "3.12", "3.13"]

nox.options.default_venv_backend = "uv|virtualenv"
nox.options.sessions = ["tests", "tests_lowest", "stress", "lint", "typecheck", "docs"]
nox.options.reuse_venv = "yes"

# Interpreters installed with pyenv but not on PATH still count as installed.
_pyenv_root = Path(os.environ.get("PYENV_ROOT", Path.home() / ".pyenv"))
for _version in PYTHONS:
    for _bin in sorted(glob.glob(str(_pyenv_root / "versions" / f"{_version}.*" / "bin"))):
        if _bin not in os.environ.get("PATH", ""):
            os.environ["PATH"] = os.pathsep.join([os.environ.get("PATH", ""), _bin])

PYPROJECT = nox.project.load_toml("pyproject.toml")


def install(session: nox.Session, *groups: str, extras: str = "") -> None:
    requirements: list[str] = []
    for group in groups:
        requirements.extend(nox.project.dependency_groups(PYPROJECT, group))
    session.install("-e", f".{extras}", *requirements)


# PyTorch's CPU wheel for Python 3.11, on this project's machines. Installed by file, never
# by name: asked for by name, an installer may pull a CUDA build of several GB.
TORCH_WHEELS = "/opt/wheels/torch-2.13.0+cpu-cp311-cp311-*.whl"


def install_torch(session: nox.Session) -> bool:
    """Install the local CPU build of torch, where there is one for this Python."""
    wheels = sorted(glob.glob(TORCH_WHEELS))
    if session.python != "3.11" or not wheels:
        session.log("no local CPU torch wheel for this Python: the torch tests will skip")
        return False
    session.install(wheels[-1], "numpy")
    return True


@nox.session(python=PYTHONS)
def tests(session: nox.Session) -> None:
    """Run the test suite (every backend: asyncio, uvloop, trio; torch on 3.11)."""
    install(session, "test")
    install_torch(session)
    session.run("pytest", *session.posargs)


@nox.session(name="tests_lowest", python="3.10")
def tests_lowest(session: nox.Session) -> None:
    """Run the tests against the lowest versions the dependencies allow (oldest Python)."""
    requirements = nox.project.dependency_groups(PYPROJECT, "test")
    session.install("--resolution", "lowest-direct", "-e", ".", *requirements)
    session.run("pytest", *session.posargs)


@nox.session(python="3.11")
def stress(session: nox.Session) -> None:
    """Run the long stress tests."""
    install(session, "test")
    session.run("pytest", "-m", "stress", "-rP", *session.posargs)


@nox.session(python="3.11")
def lint(session: nox.Session) -> None:
    """Check formatting and lint with ruff."""
    install(session, "lint")
    session.run("ruff", "format", "--check", ".")
    session.run("ruff", "check", ".")


@nox.session(python="3.11")
def typecheck(session: nox.Session) -> None:
    """mypy --strict and pyright on src and examples."""
    install(session, "typecheck")
    install_torch(session)  # examples/torch_inference.py is checked against real torch
    session.run("mypy")
    session.run("pyright")


@nox.session(python="3.11")
def docs(session: nox.Session) -> None:
    """Build the documentation site strictly."""
    install(session, "docs")
    session.run(
        "mkdocs",
        "build",
        "--strict",
        "--site-dir",
        str(ROOT / "site"),
        env={"NO_MKDOCS_2_WARNING": "1"},
    )


@nox.session(python="3.11")
def demo(session: nox.Session) -> None:
    """Run the examples: a script, async apps on asyncio and trio, FastAPI, torch."""
    install(session, "test")
    install_torch(session)
    for example in sorted((ROOT / "examples").glob("*.py")):
        session.run("python", str(example))


@nox.session(python="3.11")
def bench(session: nox.Session) -> None:
    """µs per fork+wait against asyncio, anyio, asyncer and ThreadPoolExecutor; import time."""
    install(session, "test", "bench")
    session.run("python", str(ROOT / "benchmarks" / "bench_fork.py"), *session.posargs)


@nox.session(name="bench_torch", python="3.11")
def bench_torch(session: nox.Session) -> None:
    """A forward forking K sub-modules: sequential, anyfork, torch.jit.fork (CPU torch)."""
    install(session, "test")
    if not install_torch(session):
        session.skip("the local CPU build of torch for Python 3.11 is not on this machine")
    session.run("python", str(ROOT / "benchmarks" / "bench_torch.py"), *session.posargs)
    session.run("python", str(ROOT / "benchmarks" / "torch_exit.py"))


@nox.session(name="bench_fastapi", python="3.11")
def bench_fastapi(session: nox.Session) -> None:
    """Load FastAPI fan-out endpoints under uvicorn with wrk: anyfork against anyio and asyncio."""
    if shutil.which("wrk") is None:
        session.skip(
            "wrk is not installed: install it (Debian/Ubuntu: 'apt-get install -y wrk'; "
            "macOS: 'brew install wrk') and run this again"
        )
    install(session, "test", "bench")
    session.run("python", str(ROOT / "benchmarks" / "bench_fastapi.py"), *session.posargs)
