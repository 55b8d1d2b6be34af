"""How often a script that exits with TorchScript work pending crashes, with and without anyfork.

Runs the same script N times each way: four ``torch.jit.fork`` tasks still running when the
script ends, either left alone or handed to ``anyfork.collect_all`` (and never waited for).
A crash is a non-zero exit: torch's "terminate called without an active exception" abort,
or a segmentation fault.

    python benchmarks/torch_exit.py [--runs N]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

SCRIPT = """
import warnings
warnings.simplefilter("ignore")
import torch
{import_anyfork}

def heavy(x: torch.Tensor) -> torch.Tensor:
    for _ in range(200):
        x = torch.tanh(x @ x)
    return x

scripted = torch.jit.script(heavy)

def fork_heavy(x: torch.Tensor) -> torch.jit.Future[torch.Tensor]:
    return torch.jit.fork(scripted, x)

fork_in_torchscript = torch.jit.script(fork_heavy)
x = torch.rand(512, 512)
futures = [fork_in_torchscript(x) for _ in range(4)]
{hand_over}
"""


def crashes(source: str, runs: int) -> int:
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "pending.py"  # TorchScript needs a source file
        path.write_text(source)
        return sum(
            subprocess.run([sys.executable, str(path)], capture_output=True).returncode != 0
            for _ in range(runs)
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=16)
    args = parser.parse_args()
    alone = SCRIPT.format(import_anyfork="", hand_over="")
    handed = SCRIPT.format(
        import_anyfork="import anyfork", hand_over="anyfork.collect_all(futures)"
    )
    print(f"torch.jit.fork work pending at exit, {args.runs} runs each:")
    print(f"  left alone:                   {crashes(alone, args.runs)} crashed")
    print(f"  handed to anyfork.collect_all: {crashes(handed, args.runs)} crashed")


if __name__ == "__main__":
    main()
