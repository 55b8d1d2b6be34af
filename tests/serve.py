"""Serve tests/server_app.py on 127.0.0.1, port 0: ``python tests/serve.py SERVER``.

SERVER is ``uvicorn-asyncio``, ``uvicorn-uvloop`` or ``hypercorn-trio``. The chosen port
is printed as ``port N`` once the socket is bound; SIGINT or SIGTERM shut the server down
gracefully (lifespan shutdown included).
"""

from __future__ import annotations

import signal
import socket
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))


def bound_socket() -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    sock.listen(128)
    print(f"port {sock.getsockname()[1]}", flush=True)
    return sock


def main(server: str) -> None:
    from server_app import app

    sock = bound_socket()
    if server.startswith("uvicorn-"):
        import uvicorn

        loop = server.removeprefix("uvicorn-")
        config = uvicorn.Config(app, loop=loop, lifespan="on", log_level="warning")
        try:
            uvicorn.Server(config).run(sockets=[sock])
        except KeyboardInterrupt:
            pass  # uvicorn re-raises the Ctrl-C it shut down for, once shutdown is complete
    elif server == "hypercorn-trio":
        import trio
        from hypercorn.config import Config
        from hypercorn.trio import serve

        config = Config()
        config.bind = [f"fd://{sock.fileno()}"]
        config.loglevel = "WARNING"

        async def until_signalled() -> None:
            with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
                async for _ in signals:
                    return

        async def run() -> None:
            await serve(app, config, shutdown_trigger=until_signalled)  # type: ignore[arg-type]

        trio.run(run)
    else:
        raise SystemExit(f"unknown server {server!r}")


if __name__ == "__main__":
    main(sys.argv[1])
