"""A progress bar over ``anyfork.as_completed``: in a script, then in an async app.

Run it with ``python examples/progress.py`` (``pip install tqdm``). The bar moves as each
fork finishes, in the order they finish, not the order they were forked; a failed fork
moves it too, and is reported at the end instead of stopping the others.

The bars write to stdout: tqdm's default, stderr, is where Python reports errors.
"""

from __future__ import annotations

import random
import sys
import time

import anyio
from tqdm import tqdm
from tqdm.asyncio import tqdm as async_tqdm

import anyfork


def resize(image: int) -> int:
    """Blocking work: runs in a worker thread."""
    time.sleep(random.uniform(0.005, 0.03))
    if image == 13:
        raise ValueError(f"image {image} is corrupt")
    return image * 2


async def upload(image: int) -> str:
    """Async work: runs as a task on the loop."""
    await anyio.sleep(random.uniform(0.005, 0.03))
    return f"image-{image}.png"


def script() -> None:
    futures = [anyfork.fork(resize, image) for image in range(40)]
    failed: list[BaseException] = []
    # tqdm wraps the iterator: the bar moves by one as each future arrives.
    arrivals = anyfork.as_completed(futures, timeout=60)
    for future in tqdm(arrivals, total=len(futures), desc="resize", unit="img", file=sys.stdout):
        try:
            future.value()
        except ValueError as exc:
            failed.append(exc)
    print(f"script: {len(futures) - len(failed)} resized, failed: {failed}")


async def app() -> None:
    async with anyfork.scope():
        uploads = [anyfork.fork(upload, image) for image in range(40)]
        resizes = [anyfork.fork(resize, image) for image in range(40, 50)]
        futures = [*uploads, *resizes]
        arrivals = anyfork.as_completed(futures, timeout=60)
        # tqdm.asyncio's bar wraps an async iterator on any backend (it only awaits its
        # __anext__), and 'async for' never blocks the loop: other tasks run while it waits.
        bar = async_tqdm(arrivals, total=len(futures), desc="upload", unit="img", file=sys.stdout)
        async for future in bar:
            bar.set_postfix_str(str(future.value()), refresh=False)
    print(f"app: {len(uploads)} uploaded, {len(resizes)} resized")


if __name__ == "__main__":
    script()
    anyio.run(app)
    anyio.run(app, backend="trio")
