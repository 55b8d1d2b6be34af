"""Development sessions: ``nox`` runs tests, lint, typecheck, docs and build; see README."""

from __future__ import annotations

import glob
import os
import re
import shutil
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path

import nox

ROOT = Path(__file__).parent
PYTHONS = ["3.10", "3.11", "3.12", "3.13"]

nox.options.default_venv_backend = "uv|virtualenv"
nox.options.sessions = [
    "tests",
    "tests_lowest",
    "tests_freethreaded",
    "stress",
    "lint",
    "typecheck",
    "docs",
    "build",
]
nox.options.reuse_venv = "yes"

# The free-threaded build the tests also run on with the GIL off (tests_freethreaded).
FREE_THREADED = "3.13t"
BUILD_FREE_THREADED = ROOT / "tools" / "build_freethreaded_python.sh"
PYENV_ROOT = Path(os.environ.get("PYENV_ROOT", Path.home() / ".pyenv"))


def add_pyenv_interpreters_to_path() -> None:
    """Interpreters installed with pyenv but not on PATH still count as installed."""
    patterns = [f"{version}.*" for version in PYTHONS] + ["3.13.*t"]
    for pattern in patterns:
        for bin_ in sorted(glob.glob(str(PYENV_ROOT / "versions" / pattern / "bin"))):
            if bin_ not in os.environ.get("PATH", "").split(os.pathsep):
                os.environ["PATH"] = os.pathsep.join([os.environ.get("PATH", ""), bin_])


add_pyenv_interpreters_to_path()

PYPROJECT = nox.project.load_toml("pyproject.toml")


# The versions the checks (lint, typecheck, docs) run with, locked so that a fresh clone gets
# the verdict CI got: a new checker or stub release must not fail a change that did not cause
# it. `nox -s lock` upgrades them on purpose. The test sessions stay unlocked: they test what
# users get (the newest versions allowed, and tests_lowest the oldest).
CHECKS_LOCK = ROOT / "requirements" / "checks.txt"
CHECK_GROUPS = ("lint", "typecheck", "docs")


def install(session: nox.Session, *groups: str, extras: str = "", locked: bool = False) -> None:
    requirements: list[str] = []
    for group in groups:
        requirements.extend(nox.project.dependency_groups(PYPROJECT, group))
    constraints = ["--constraint", str(CHECKS_LOCK)] if locked else []
    session.install(*constraints, "-e", f".{extras}", *requirements)


# PyTorch is installed from a local CPU wheel file, never by name: asked for by name, an
# installer may pull a CUDA build of several GB. The wheel is looked for in the folders (or
# files) that ANYFORK_TORCH_WHEELS names, else in pip's own find-links (PIP_FIND_LINKS), for
# the session's Python. With none, the torch tests skip, and the session says so loudly.
TORCH_WHEEL_PLACES = ("ANYFORK_TORCH_WHEELS", "PIP_FIND_LINKS")


def local_torch_wheel(python: str) -> Path | None:
    """The newest local CPU wheel of torch for this Python, if one is on this machine."""
    tag = "cp" + python.replace(".", "")
    for variable in TORCH_WHEEL_PLACES:
        found: list[Path] = []
        for place in os.environ.get(variable, "").split():
            path = Path(place.removeprefix("file://"))
            if path.is_dir():
                found.extend(path.glob(f"torch-*+cpu-{tag}-{tag}-*.whl"))
            elif path.name.startswith("torch-") and f"-{tag}-" in path.name and path.is_file():
                found.append(path)
        if found:
            return max(found, key=lambda wheel: wheel.name)
    return None


def install_torch(session: nox.Session) -> bool:
    """Install the local CPU build of torch, where there is one for this Python."""
    wheel = local_torch_wheel(str(session.python))
    if wheel is None:
        session.warn(
            f"TORCH SKIPPED: no local CPU wheel of torch for Python {session.python} in "
            f"{' or '.join(TORCH_WHEEL_PLACES)}, so this session runs without torch; set "
            "ANYFORK_TORCH_WHEELS to a folder holding one (e.g. from 'pip download torch "
            "--no-deps --index-url <PyTorch's CPU index>') to include it"
        )
        return False
    session.install(str(wheel), "numpy")
    return True


# Ray (anyfork.ray) is an 80 MB install whose embedded cluster takes seconds to start: the
# tests of it run on one Python only, to keep CI within its time. Elsewhere they skip, loudly.
RAY = "ray==2.60.0"
RAY_PYTHON = "3.11"


def install_ray(session: nox.Session) -> bool:
    """Install Ray in the one test session that runs the Ray tests (RAY_PYTHON)."""
    if str(session.python) != RAY_PYTHON:
        session.warn(
            f"RAY SKIPPED: Ray is installed for the tests on Python {RAY_PYTHON} only (an 80 MB "
            f"install and a local cluster per test module), so tests/test_ray*.py and "
            f"examples/ray_fanout.py skip on Python {session.python}"
        )
        return False
    session.install(RAY)
    return True


@nox.session(python=PYTHONS)
def tests(session: nox.Session) -> None:
    """Run the test suite (every backend: asyncio, uvloop, trio; torch and Ray on 3.11)."""
    install(session, "test")
    has_torch = install_torch(session)
    has_ray = install_ray(session)
    session.run("pytest", *session.posargs)
    if not has_torch:
        session.warn(f"TORCH TESTS SKIPPED on Python {session.python}: see 'TORCH SKIPPED' above")
    if not has_ray:
        session.warn(f"RAY TESTS SKIPPED on Python {session.python}: see 'RAY SKIPPED' above")


# Packages of the test group that tests_freethreaded leaves out, so that their tests skip there
# (torch too: its local CPU wheel is for CPython 3.11). Most cannot be installed on
# free-threaded 3.13: no cp313t wheel, and their source builds download what the package
# registries do not serve. hypothesis: its native part needs Rust crates; fastapi:
# pydantic-core needs Rust crates; ipykernel and jupyter-client: pyzmq downloads libsodium.
# distributed installs, but does not claim free-threading support, and its clusters crashed
# the interpreter (segmentation faults in Dask's own threads, at a client's close and in
# pytest's process) in 2 of 4 runs of its tests with the GIL off; anyfork.dask is pure
# Python over it, covered by every other test session. uvloop, trio and the rest install and
# run with the GIL off.
NOT_FREE_THREADED = {"hypothesis", "fastapi", "ipykernel", "jupyter-client", "distributed"}


@nox.session(name="freethreaded_python", python=False)
def freethreaded_python(session: nox.Session) -> None:
    """Find a free-threaded CPython 3.13 (python3.13t), else build one (tools/, ~5 min)."""
    found = shutil.which("python" + FREE_THREADED)
    if found is None:
        session.log(f"no python{FREE_THREADED} here: building one with pyenv, once")
        session.run("bash", str(BUILD_FREE_THREADED), external=True)
        add_pyenv_interpreters_to_path()
        found = shutil.which("python" + FREE_THREADED)
        if found is None:
            session.error(f"{BUILD_FREE_THREADED.name} ran but no python{FREE_THREADED} is on PATH")
    session.log(f"free-threaded Python: {found}")


@nox.session(name="tests_freethreaded", python=FREE_THREADED, requires=["freethreaded_python"])
def tests_freethreaded(session: nox.Session) -> None:
    """Run the test suite on free-threaded CPython 3.13 with the GIL off (PYTHON_GIL=0)."""
    requirements = [
        requirement
        for requirement in nox.project.dependency_groups(PYPROJECT, "test")
        if requirement_name(requirement) not in NOT_FREE_THREADED
    ]
    session.install("-e", ".", *requirements)
    gil_off = {"PYTHON_GIL": "0"}  # also for the scripts the tests start (they inherit it)
    session.run("python", "-c", "import sys; assert not sys._is_gil_enabled()", env=gil_off)
    session.run("pytest", *session.posargs, env=gil_off)
    left_out = ", ".join(sorted(NOT_FREE_THREADED))
    session.warn(f"FREE-THREADED: {left_out}, torch and ray not installed, so their tests skipped")


def requirement_name(requirement: str) -> str:
    """A requirement's project name, normalized: 'uvloop>=0.21; ...' -> 'uvloop'."""
    name = re.split(r"[\s\[<>=!~;@]", requirement, maxsplit=1)[0]
    return re.sub(r"[-_.]+", "-", name).lower()


@nox.session(name="tests_lowest", python="3.10")
def tests_lowest(session: nox.Session) -> None:
    """Run the tests against the lowest versions the dependencies allow (oldest Python)."""
    requirements = nox.project.dependency_groups(PYPROJECT, "test")
    session.install("--resolution", "lowest-direct", "-e", ".", *requirements)
    session.run("pytest", *session.posargs)
    session.warn(f"RAY TESTS SKIPPED: Ray is installed for the tests on Python {RAY_PYTHON} only")


@nox.session(python="3.11")
def stress(session: nox.Session) -> None:
    """Run the long stress tests."""
    install(session, "test")
    session.run("pytest", "-m", "stress", "-rP", *session.posargs)


@nox.session(python="3.11")
def lint(session: nox.Session) -> None:
    """Check formatting and lint with ruff."""
    install(session, "lint", locked=True)
    session.run("ruff", "format", "--check", ".")
    session.run("ruff", "check", ".")


@nox.session(python="3.11")
def typecheck(session: nox.Session) -> None:
    """mypy --strict and pyright on src, examples and the docs tooling (docs/_ext)."""
    install(session, "typecheck", "docs", locked=True)  # docs/_ext is a griffe extension
    install_torch(session)  # examples/torch_inference.py is checked against real torch
    session.run("mypy")
    session.run("pyright")


@nox.session(python="3.11")
def docs(session: nox.Session) -> None:
    """Build the documentation site strictly, then fail on any reST it shows as text."""
    install(session, "docs", locked=True)
    session.run(
        "mkdocs",
        "build",
        "--strict",
        "--site-dir",
        str(ROOT / "site"),
        env={"NO_MKDOCS_2_WARNING": "1"},
    )
    session.run("python", str(ROOT / "docs" / "_ext" / "check_site.py"), str(ROOT / "site"))


@nox.session(python=False)
def lock(session: nox.Session) -> None:
    """Upgrade the locked versions of the check tools (requirements/checks.txt), on purpose."""
    groups = [arg for group in CHECK_GROUPS for arg in ("--group", group)]
    output = str(CHECKS_LOCK.relative_to(ROOT))
    compile_ = [sys.executable, "-m", "uv", "pip", "compile", "pyproject.toml", *groups]
    options = ["--universal", "--python-version", "3.11", "--upgrade", "--quiet"]
    header = ["--custom-compile-command", "nox -s lock", "--output-file", output]
    session.run(*compile_, *options, *header, *session.posargs)


@nox.session(python="3.11")
def build(session: nox.Session) -> None:
    """Build the sdist and wheel, check them, and smoke-test the wheel in a fresh venv."""
    session.install("uv", "twine>=6.1")  # 6.1: checks Metadata-Version 2.4 (License-Expression)
    tmp = Path(session.create_tmp()).resolve()
    dist = tmp / "dist"
    shutil.rmtree(dist, ignore_errors=True)
    # uv builds the wheel from the sdist, so a file missing from the sdist fails here too.
    session.run("uv", "build", "--quiet", "--out-dir", str(dist), str(ROOT))
    (sdist,) = dist.glob("*.tar.gz")
    (wheel,) = dist.glob("*.whl")
    session.run("twine", "check", "--strict", str(sdist), str(wheel))
    version = wheel.name.split("-")[1]
    if problems := distribution_problems(sdist, wheel, version):
        session.error("; ".join(problems))
    session.log(f"{sdist.name} and {wheel.name} hold what a release needs")

    # Install the wheel alone (no editable install) in a new venv outside the source tree, and
    # run the smoke script there in isolated mode (-I: neither it nor the cwd is on sys.path).
    with tempfile.TemporaryDirectory(prefix="anyfork-smoke-") as outside:
        venv = Path(outside) / "venv"
        session.run("uv", "venv", "--quiet", "--python", f"{session.bin}/python", str(venv))
        python = str(venv / "bin" / "python")
        session.run("uv", "pip", "install", "--quiet", "--python", python, str(wheel))
        smoke = shutil.copy(ROOT / "tests" / "smoke_installed.py", outside)
        with session.chdir(outside):
            session.run(python, "-I", smoke, version, external=True)


def distribution_problems(sdist: Path, wheel: Path, version: str) -> list[str]:
    """What the sdist and wheel lack, or hold, that a release must not."""
    problems: list[str] = []
    if sdist.name != f"anyfork-{version}.tar.gz":
        problems.append(f"{sdist.name} is not version {version}, as {wheel.name} is")
    with tarfile.open(sdist) as archive:
        in_sdist = {member.split("/", 1)[-1] for member in archive.getnames()}
    needed = {"LICENSE", "README.md", "CHANGELOG.md", "pyproject.toml", "src/anyfork/py.typed"}
    if missing := sorted(needed - in_sdist):
        problems.append(f"{sdist.name} lacks {missing}")
    info = f"anyfork-{version}.dist-info"
    with zipfile.ZipFile(wheel) as archive:
        in_wheel = set(archive.namelist())
        metadata = archive.read(f"{info}/METADATA").decode()
    needed = {"anyfork/__init__.py", "anyfork/py.typed", f"{info}/licenses/LICENSE"}
    if missing := sorted(needed - in_wheel):
        problems.append(f"{wheel.name} lacks {missing}")
    if strays := sorted(n for n in in_wheel if not n.startswith(("anyfork/", f"{info}/"))):
        problems.append(f"{wheel.name} holds files outside the package: {strays}")
    for line in ("License-Expression: MIT", "License-File: LICENSE", f"Version: {version}"):
        if f"\n{line}\n" not in metadata:
            problems.append(f"{wheel.name}'s METADATA lacks {line!r}")
    return problems


@nox.session(python="3.11")
def demo(session: nox.Session) -> None:
    """Run the examples: a script, async apps on asyncio and trio, FastAPI, torch, Dask, Ray."""
    install(session, "test")
    install_torch(session)
    session.install(RAY)  # examples/ray_fanout.py
    for example in sorted((ROOT / "examples").glob("*.py")):
        session.run("python", str(example))


@nox.session(python="3.11")
def bench(session: nox.Session) -> None:
    """µs per fork+wait against asyncio, anyio, asyncer and ThreadPoolExecutor; import time."""
    install(session, "test", "bench")
    session.run("python", str(ROOT / "benchmarks" / "bench_fork.py"), *session.posargs)
    session.run("python", str(ROOT / "benchmarks" / "bench_debug.py"))


@nox.session(name="bench_options", python="3.11")
def bench_options(session: nox.Session) -> None:
    """A fork under options(limit=n) against a plain fork and a CapacityLimiter-guarded
    to_thread.run_sync; how close to its deadline a coroutine fork fails."""
    install(session, "test", "bench")
    session.run("python", str(ROOT / "benchmarks" / "bench_options.py"), *session.posargs)


@nox.session(name="bench_map", python="3.11")
def bench_map(session: nox.Session) -> None:
    """anyfork.map over 10,000 items: against ThreadPoolExecutor.map (sync) and an anyio task
    group with a CapacityLimiter (coroutines)."""
    install(session, "test")
    session.run("python", str(ROOT / "benchmarks" / "bench_map.py"), *session.posargs)


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


@nox.session(name="bench_process", python="3.11")
def bench_process(session: nox.Session) -> None:
    """Process forks against ProcessPoolExecutor and anyio.to_process; a CPU fan-out."""
    install(session, "test")
    install_torch(session)  # the tensor row, when a local torch wheel is found
    session.run("python", str(ROOT / "benchmarks" / "bench_process.py"), *session.posargs)


@nox.session(name="bench_dask", python="3.11")
def bench_dask(session: nox.Session) -> None:
    """Remote fork+wait latency and a fan-out of 200 against raw Dask, same LocalCluster."""
    install(session, "test")
    session.run("python", str(ROOT / "benchmarks" / "bench_dask.py"), *session.posargs)


@nox.session(name="bench_ray", python=RAY_PYTHON)
def bench_ray(session: nox.Session) -> None:
    """Remote fork+wait latency and a fan-out of 200 against raw Ray, and through anyfork.dask."""
    install(session, "test")
    session.install(RAY)
    session.run("python", str(ROOT / "benchmarks" / "bench_ray.py"), *session.posargs)
