"""100,000 forks a run, in a fresh interpreter per runner (nox -s stress).

The burst itself (``tests/burst.py``) checks every outcome; here we check that the run
succeeded quietly and left nothing behind. Figures are printed (``-rP`` shows them).
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest

BURST = Path(__file__).with_name("burst.py")
FORKS = int(os.environ.get("ANYFORK_STRESS_FORKS", "100000"))


def run_burst(runner: str, forks: int, seed: int) -> dict[str, object]:
    result = subprocess.run(
        [sys.executable, str(BURST), runner, str(forks), str(seed)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    where = f"runner={runner} forks={forks} seed={seed}"
    assert result.returncode == 0, f"{where}\n{result.stderr[-5000:]}"
    # Every failure was retrieved by a waiter or raised by its scope: nothing to log.
    assert result.stderr == "", f"{where}\n{result.stderr[-5000:]}"
    figures: dict[str, object] = json.loads(result.stdout.splitlines()[-1])
    figures["seed"] = seed
    return figures


@pytest.mark.stress
@pytest.mark.timeout(900)
@pytest.mark.parametrize("runner", ["asyncio", "uvloop", "trio", "script"])
def test_a_burst_of_forks_resolves_each_exactly_once_and_leaks_nothing(runner: str) -> None:
    if runner == "uvloop":
        pytest.importorskip("uvloop")
    seed = int(os.environ.get("ANYFORK_STRESS_SEED", random.randrange(2**32)))
    figures = run_burst(runner, FORKS, seed)
    print(json.dumps(figures))
    assert figures["futures_alive_after"] == 0, figures
    grown = figures["rss_after_mib"] - figures["rss_baseline_mib"]  # type: ignore[operator]
    assert grown < 64, figures
    # Idle worker threads retire; only the threads burst.py counts in its bound may stay (a
    # second "anyfork reporter", started by failures stored in two threads at once, once did).
    assert figures["threads_after"] <= figures["threads_bound"], figures
    names = figures["thread_names"]
    assert isinstance(names, list) and names.count("anyfork reporter") == 1, figures


@pytest.mark.parametrize("runner", ["asyncio", "script"])
def test_a_small_burst_on_every_run(runner: str) -> None:
    # The same checks at 1/25 of the size, so the default test run covers them too.
    figures = run_burst(runner, 4_000, random.randrange(2**32))
    assert figures["futures_alive_after"] == 0, figures
