"""The two ends of a process fork's trip: its job, and the worker process that runs it.

A :class:`Job` is one process fork as the pool (``_process_pool``) schedules it. A
:class:`Worker` is one worker process, started as a fresh interpreter that runs
``_process_worker.serve``, and this side of its socket: the framing of
``multiprocessing.connection`` (which the worker reads), written without blocking by a
forking thread for a small call, read by the thread that feeds the worker.
"""

from __future__ import annotations

import json
import os
import select
import socket
import struct
import subprocess
import sys
import threading
from collections.abc import Callable
from typing import Any

from ._future import Future
from ._state import Work

__all__ = ["DIRECT_SEND", "Job", "Worker"]


def _stop_nothing(job: Job) -> None:
    pass


class Job(Work):
    """One process fork: its pickled call, and the worker running it while it runs."""

    __slots__ = ("future", "name", "request", "started", "stop", "worker")

    kind = "process"

    def __init__(self, future: Future[Any], name: str, request: bytes) -> None:
        self.future = future
        self.name = name
        self.request = request
        self.started = False
        self.worker: Worker | None = None  # set while its worker runs it
        self.stop: Callable[[Job], None] = _stop_nothing  # the pool's, once submitted

    def state(self, future: Future[Any]) -> str:
        return "running" if self.started else "queued"

    def cancel(self, future: Future[Any]) -> None:
        """Its future was cancelled, or settled otherwise (a deadline): stop the work."""
        self.stop(self)


# How a worker process starts: its sys.path is the parent's, set before anything is imported.
WORKER_MAIN = (
    "import sys, json; sys.path[:] = json.loads(sys.argv[3]); "
    "from anyfork._process_worker import serve; serve(int(sys.argv[1]), int(sys.argv[2]))"
)

# A call this small is written straight into an idle worker's socket by the forking thread
# (it fits the socket's buffer: the write never blocks): one thread hop fewer per fork.
DIRECT_SEND = 64 * 1024


class Worker:
    """One worker process, this side of its socket (non-blocking: the forking thread may
    write a small call into it), and the wake-up pipe of the thread feeding it."""

    def __init__(self, lifeline: int) -> None:
        here, there = socket.socketpair()
        try:
            self.process = subprocess.Popen(
                [
                    sys.executable,
                    "-c",
                    WORKER_MAIN,
                    str(there.fileno()),
                    str(lifeline),
                    json.dumps(sys.path),
                ],
                pass_fds=(there.fileno(), lifeline),
                stdin=subprocess.DEVNULL,
            )
        except BaseException:
            here.close()
            raise
        finally:
            there.close()
        here.setblocking(False)
        self.sock = here
        self.wake_r, self.wake_w = os.pipe()
        os.set_blocking(self.wake_r, False)
        os.set_blocking(self.wake_w, False)
        # poll, not select: select fails on a descriptor numbered 1024 or more.
        self._readable = select.poll()
        self._readable.register(here, select.POLLIN)
        self._writable = select.poll()
        self._writable.register(here, select.POLLOUT)
        self._woken = select.poll()
        self._woken.register(here, select.POLLIN)
        self._woken.register(self.wake_r, select.POLLIN)
        self._end_lock = threading.Lock()
        self._ended = False
        self.job: Job | None = None  # the job it runs, or was given and has yet to run
        self.unsent = False  # the job was given to it but not sent yet (its thread sends it)
        self.killed = False  # killed to stop its job

    @property
    def pid(self) -> int:
        return self.process.pid

    def wake(self) -> None:
        with self._end_lock:
            if self._ended:
                return
            try:
                os.write(self.wake_w, b"!")
            except OSError:  # full: a wake-up is pending anyway
                pass

    def kill(self) -> None:
        try:
            self.process.kill()
        except OSError:  # already gone
            pass

    def send(self, data: bytes) -> None:
        """Write one frame (multiprocessing.connection's framing, which the worker reads).

        :raises OSError: if the worker is gone
        """
        size = len(data)
        header = struct.pack("!i", size) if size <= 0x7FFFFFFF else struct.pack("!iQ", -1, size)
        if size <= DIRECT_SEND:
            self._send_all(memoryview(header + data))
        else:
            self._send_all(memoryview(header))
            self._send_all(memoryview(data))

    def _send_all(self, view: memoryview) -> None:
        while view:
            try:
                view = view[self.sock.send(view) :]
            except BlockingIOError:
                self._writable.poll(_POLL_MS)

    def receive(self) -> bytearray:
        """Read one frame; block until it is complete.

        :raises EOFError: if the worker died (its end of the socket closed)
        """
        (size,) = struct.unpack("!i", self._receive_exactly(4))
        if size == -1:
            (size,) = struct.unpack("!Q", self._receive_exactly(8))
        return self._receive_exactly(size)

    def _receive_exactly(self, size: int) -> bytearray:
        buffer = bytearray(size)
        view = memoryview(buffer)
        got = 0
        while got < size:
            try:
                count = self.sock.recv_into(view[got:])
            except BlockingIOError:
                self._readable.poll(_POLL_MS)
                continue
            except OSError:
                raise EOFError from None
            if count == 0:
                raise EOFError
            got += count
        return buffer

    def wait_idle(self, timeout: float | None) -> bool:
        """Block until a job is given to this worker (its socket becomes readable when a
        forking thread sent one and the reply comes, or at its death; the wake-up pipe when
        its thread must send one, retire or stop), or ``timeout`` elapses. Whether the
        wake-up pipe woke it."""
        events = self._woken.poll(None if timeout is None else timeout * 1000)
        with self._end_lock:
            if self._ended or not any(fd == self.wake_r for fd, _ in events):
                return False
            try:
                while os.read(self.wake_r, 64):
                    pass
            except OSError:  # drained
                pass
            return True

    def end(self, timeout: float | None) -> int:
        """Close the socket (an idle worker then exits), wait up to ``timeout`` seconds for
        the process to end, kill it if it has not; return its exit code. Any thread, any
        number of times: the descriptors are closed once."""
        with self._end_lock:
            if not self._ended:
                self._ended = True
                self.sock.close()
                os.close(self.wake_r)
                os.close(self.wake_w)
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            return self.process.wait()


# Milliseconds between looks at a socket that pool.stop() may have closed meanwhile.
_POLL_MS = 1000
