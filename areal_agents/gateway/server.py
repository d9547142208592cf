"""Serve an ASGI app with uvicorn on a background thread (tests, notebooks, benchmarks).

Example:
    >>> from areal_agents.gateway import Gateway
    >>> with ServerThread(Gateway().app) as server:  # doctest: +SKIP
    ...     print(server.url)
"""

from __future__ import annotations

import socket
import threading
import time
from typing import Any


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free a moment ago on ``host``."""
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


class ServerThread:
    """uvicorn serving ``app`` on ``host:port`` (a free port by default) in a daemon thread.

    Use as a context manager: entering waits until the server accepts connections (or raises
    ``RuntimeError`` after ``startup_timeout`` seconds); leaving stops it and joins the thread.
    """

    def __init__(self, app: Any, host: str = "127.0.0.1", port: int | None = None,
                 startup_timeout: float = 10.0) -> None:
        import uvicorn

        self.host = host
        self.port = port or free_port(host)
        self.startup_timeout = startup_timeout
        config = uvicorn.Config(app, host=host, port=self.port, log_level="warning",
                                lifespan="off")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True,
                                       name=f"uvicorn-{self.port}")

    @property
    def url(self) -> str:
        """``http://host:port`` of the server."""
        return f"http://{self.host}:{self.port}"

    def __enter__(self) -> ServerThread:
        self.thread.start()
        deadline = time.monotonic() + self.startup_timeout
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                self.server.should_exit = True
                raise RuntimeError(f"uvicorn did not start on {self.url}; is the port taken?")
            time.sleep(0.01)
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)
