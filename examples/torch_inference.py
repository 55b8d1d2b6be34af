"""A PyTorch model whose forward forks its two towers, served from a script and an app.

Run it with ``python examples/torch_inference.py`` (it needs torch: ``pip install torch``).

``TwoTower.forward`` was written for ``torch.jit.fork``; the migration is the two calls
below, ``anyfork.fork`` and ``anyfork.wait``. The towers then run in parallel in plain
Python, in worker threads (torch releases the GIL inside its kernels), with the grad mode
of the caller: under ``torch.inference_mode()`` the forks build no autograd graph either.
"""

from __future__ import annotations

import os
import sys
import time

import anyio
import torch

import anyfork


class Tower(torch.nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.layers = torch.nn.Sequential(
            torch.nn.Linear(width, width), torch.nn.ReLU(), torch.nn.Linear(width, 64)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.layers(x)
        return out


class TwoTower(torch.nn.Module):
    """Scores (user, item) pairs; the two towers are independent, so they are forked."""

    def __init__(self, width: int = 512) -> None:
        super().__init__()
        self.user_tower = Tower(width)
        self.item_tower = Tower(width)

    def forward(self, users: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
        # Before: torch.jit.fork(self.user_tower, users) ... torch.jit.wait(user_future)
        user_future: anyfork.Future[torch.Tensor] = anyfork.fork(self.user_tower, users)
        item_future: anyfork.Future[torch.Tensor] = anyfork.fork(self.item_tower, items)
        return (anyfork.wait(user_future) * anyfork.wait(item_future)).sum(-1)


def from_a_script(model: TwoTower) -> None:
    users, items = torch.randn(256, 512), torch.randn(256, 512)
    started = time.perf_counter()
    with torch.inference_mode():
        scores = model(users, items)
    elapsed = (time.perf_counter() - started) * 1000
    print(f"script: {tuple(scores.shape)} scores, no autograd graph: {not scores.requires_grad}")
    print(f"script: one forward in {elapsed:.1f} ms")


async def from_an_async_app(model: TwoTower) -> None:
    """Serve three requests at once: each forward is a sync fork, off the event loop."""

    def score(request_id: int) -> torch.Tensor:
        # All torch work stays in worker threads: a torch call on the loop's thread would
        # make the loop wait for the GIL behind the forks' threads.
        generator = torch.Generator().manual_seed(request_id)
        users = torch.randn(64, 512, generator=generator)
        items = torch.randn(64, 512, generator=generator)
        scores: torch.Tensor = model(users, items)
        return scores

    async def handle(request_id: int) -> str:
        with torch.no_grad():  # grad mode is captured at the fork, for its worker thread
            forward = anyfork.fork(score, request_id)
        scores = await forward  # awaited outside: the loop's own grad mode is untouched
        return f"request {request_id}: best item {int(scores.argmax())}"

    async def serve(requests: range) -> list[str]:
        async with anyfork.scope():
            replies = [anyfork.fork(handle, request_id) for request_id in requests]
        return [reply.value() for reply in replies]

    # Warm up before taking traffic, as servers do: the first requests start the app's
    # worker threads, and starting a thread while the cores are busy can stall the loop.
    await serve(range(3))
    for reply in await serve(range(3)):
        print("app:", reply)


def main() -> None:
    # CPU-bound forks: about one worker thread per core (the waiting thread works too).
    anyfork.configure(worker_threads=os.cpu_count() or 2)
    torch.set_num_threads(1)  # parallelism comes from the forks, not from within each op
    # The forks' threads run Python between torch kernels; a thread that wants the GIL
    # waits up to the switch interval (5 ms by default) for each of them. A shorter one
    # keeps the event loop responsive while they run.
    sys.setswitchinterval(0.001)
    model = TwoTower().eval()
    from_a_script(model)
    anyio.run(from_an_async_app, model)


if __name__ == "__main__":
    main()
