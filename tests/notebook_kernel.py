"""A stand-in for a Jupyter kernel, to run notebook cells where no ipykernel is used.

    python tests/notebook_kernel.py CELL [CELL ...]

As in ipykernel, the cells run one after another on an asyncio event loop running in the
main thread, inside a task, in one shared namespace, and a cell may use top-level ``await``
(compiled the way IPython compiles it). Between cells the loop runs whatever else is
scheduled, as the kernel's loop does while it waits for the next cell. A cell that raises
prints its traceback to stderr, as a notebook shows it, and the next cell still runs; the
exit status is the number of cells that raised.
"""

from __future__ import annotations

import ast
import asyncio
import inspect
import sys
import traceback


async def run_cell(source: str, namespace: dict[str, object]) -> None:
    code = compile(source, "<cell>", "exec", flags=ast.PyCF_ALLOW_TOP_LEVEL_AWAIT)
    result = eval(code, namespace)  # a coroutine if, and only if, the cell awaits
    if inspect.iscoroutine(result):
        await result


async def run_notebook(cells: list[str]) -> int:
    namespace: dict[str, object] = {"__name__": "__main__"}
    failed = 0
    for cell in cells:
        try:
            await run_cell(cell, namespace)
        except Exception:
            traceback.print_exc()
            failed += 1
        sys.stdout.flush()
        await asyncio.sleep(0)  # the kernel's loop gets control between cells
    return failed


if __name__ == "__main__":
    sys.exit(asyncio.run(run_notebook(sys.argv[1:])))
