"""A plain script, no event loop: fork blocking calls and coroutines, then wait for them.

Run it with ``python examples/script_fallback.py``. Sync work runs in anyfork's thread pool
and coroutine functions on its background event loop, so the three downloads below overlap.
The fire-and-forget audit write is joined when the interpreter exits: nothing is lost.
"""

from __future__ import annotations

import time

import anyio

import anyfork


def download(name: str, seconds: float) -> str:
    time.sleep(seconds)  # a blocking client
    return f"{name} ({seconds:.1f}s)"


async def fetch_metadata(name: str) -> dict[str, str]:
    await anyio.sleep(0.2)  # an async client
    return {"name": name, "owner": "anyfork"}


def write_audit_log(message: str) -> None:
    time.sleep(0.1)
    print(f"audit: {message}")


def main() -> None:
    started = time.perf_counter()
    files = [anyfork.fork(download, name, 0.3) for name in ("a.bin", "b.bin", "c.bin")]
    metadata = anyfork.fork(fetch_metadata, "dataset")
    anyfork.fork(write_audit_log, "downloads started")  # nobody waits: joined at exit

    print("files:", anyfork.wait_all(files))
    print("metadata:", anyfork.wait(metadata))
    elapsed = time.perf_counter() - started
    print(f"took {elapsed:.2f}s for 0.9s of blocking work and 0.2s of async work")


if __name__ == "__main__":
    main()
