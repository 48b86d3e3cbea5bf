"""Serve a checkpoint over HTTP: a captioning API with dynamic batching, and a web page.

::

    capdec serve runs/coco/checkpoint --port 8000     # then open http://127.0.0.1:8000/

    from capdec import Captioner
    from capdec.serve import ServerThread, create_app
    with ServerThread(create_app(Captioner.from_pretrained("ckpt/"))) as server:
        print(server.url)                                   # http://127.0.0.1:PORT (a free port)

See :mod:`capdec.serve.app` for the endpoints, :mod:`capdec.serve.batcher` for the batching and
:mod:`capdec.serve.limits` for what keeps the server answering under hostile clients.
Needs the ``serve`` extra (FastAPI, uvicorn, python-multipart).
"""

from __future__ import annotations

import logging
import socket
import threading
import time
import warnings
from typing import Any

from capdec.serve.app import ServeSettings, create_app
from capdec.serve.batcher import DynamicBatcher, QueueFull
from capdec.serve.limits import PixelBudget, http_protocol

__all__ = ["DynamicBatcher", "PixelBudget", "QueueFull", "ServeSettings", "ServerThread", "bind", "create_app",
           "http_protocol", "uvicorn_config"]

logger = logging.getLogger(__name__)


def bind(host: str = "127.0.0.1", port: int = 0) -> socket.socket:
    """A listening TCP socket (``port=0``: a free port, read it with ``getsockname()``)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError:
        sock.close()
        raise
    sock.listen(128)
    sock.set_inheritable(True)
    return sock


def uvicorn_config(app: Any, *, header_timeout: float | None = None, log_level: str = "warning", **kwargs: Any) -> Any:
    """A ``uvicorn.Config`` for ``app`` that leaves logging to capdec (no uvicorn handlers installed).

    Connections must send a request head within ``header_timeout`` seconds (default: the app's
    ``ServeSettings.header_timeout_s``). uvicorn's own ``limit_concurrency`` is left off: it counts open
    connections, so idle sockets would lock everyone out; the app limits requests in progress instead
    (``ServeSettings.max_requests``), and never ``/health``.
    """
    import uvicorn

    if "max_connections" in kwargs:  # the old name of a limit that counted connections; now the app's
        kwargs.pop("max_connections")
        warnings.warn("uvicorn_config(max_connections=) is ignored: requests in progress are limited by "
                      "ServeSettings.max_requests, which idle connections do not count against", DeprecationWarning,
                      stacklevel=2)
    if header_timeout is None:
        settings = getattr(getattr(app, "state", None), "settings", None)
        header_timeout = getattr(settings, "header_timeout_s", ServeSettings.header_timeout_s)
    return uvicorn.Config(app, log_config=None, log_level=log_level, http=http_protocol(header_timeout),
                          timeout_graceful_shutdown=5, **kwargs)


class ServerThread:
    """Run an app with uvicorn on a background thread (tests, notebooks, benchmarks).

    ``with ServerThread(app) as server: ...`` starts it on 127.0.0.1 at a free port (``server.url``)
    and waits until it accepts requests; leaving the block shuts it down.
    """

    def __init__(self, app: Any, *, host: str = "127.0.0.1", port: int = 0, startup_timeout: float = 60.0,
                 **config: Any):
        import uvicorn

        self.socket = bind(host, port)
        self.host, self.port = self.socket.getsockname()[:2]
        self.server = uvicorn.Server(uvicorn_config(app, **config))
        self.startup_timeout = startup_timeout
        self._thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.socket]},
                                        name="capdec-server", daemon=True)

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    def start(self) -> ServerThread:
        self._thread.start()
        deadline = time.monotonic() + self.startup_timeout
        while not self.server.started:
            if not self._thread.is_alive():
                raise RuntimeError("the server stopped during start-up (see the log)")
            if time.monotonic() > deadline:
                self.stop()
                raise TimeoutError(f"the server did not start within {self.startup_timeout:g} s")
            time.sleep(0.02)
        return self

    def stop(self, timeout: float = 30.0) -> None:
        self.server.should_exit = True
        self._thread.join(timeout)
        self.socket.close()

    def __enter__(self) -> ServerThread:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()
