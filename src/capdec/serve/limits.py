"""What keeps ``capdec serve`` answering under careless or hostile clients.

- :class:`PixelBudget`: the decoded pixels the server holds at once (images being decoded, and decoded
  images waiting to be captioned), handed out first come, first served. Memory follows pixels, not file
  counts: a 100 KB PNG can decode to 88 megapixels.
- :class:`RequestGuard`: ASGI middleware in front of the app: at most ``max_active`` captioning requests at
  once (idle connections, ``/health``, ``/info`` and the page never count), a body size limit, and a deadline
  for the whole body (a client that stalls mid-upload gets 408 and loses the connection).
- :func:`http_protocol`: uvicorn's h11 protocol with a deadline for the request head (a connection that sends
  nothing, or a head a byte at a time, is closed), which uvicorn itself does not have.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
from typing import Any

from fastapi import HTTPException
from fastapi.responses import JSONResponse

logger = logging.getLogger(__name__)

_MB = 1024 * 1024


class PixelBudget:
    """Decoded pixels the server may hold at once; waiters are served in order of arrival.

    Lives on the server's event loop: :meth:`acquire` and :meth:`release` are called there, and other
    threads give pixels back with :meth:`release_threadsafe`.
    """

    def __init__(self, capacity: int):
        if capacity < 1:
            raise ValueError(f"a pixel budget must be ≥ 1, got {capacity}")
        self.capacity = capacity
        self.held = 0
        self.peak = 0  # the most ever held at once
        self._waiters: collections.deque[tuple[int, asyncio.Future]] = collections.deque()
        self._loop: asyncio.AbstractEventLoop | None = None

    async def acquire(self, n: int, timeout: float) -> bool:
        """Take ``n`` pixels, waiting at most ``timeout`` seconds behind earlier requests; False: not in time."""
        if n > self.capacity:
            raise ValueError(f"{n:,} pixels can never fit a budget of {self.capacity:,}")
        self._loop = asyncio.get_running_loop()
        if not self._waiters and self.held + n <= self.capacity:
            self._take(n)
            return True
        entry = (n, self._loop.create_future())
        self._waiters.append(entry)
        try:
            await asyncio.wait([entry[1]], timeout=max(timeout, 0))
        except BaseException:  # cancelled while waiting: leave the line (giving back what was granted)
            self._leave(entry)
            raise
        if entry[1].done():
            return True
        self._leave(entry)
        return False

    def release(self, n: int) -> None:
        """Give back ``n`` pixels (on the event loop)."""
        assert 0 <= n <= self.held, (n, self.held)
        self.held -= n
        self._grant()

    def release_threadsafe(self, n: int) -> None:
        """Give back ``n`` pixels from any thread (a no-op once the event loop is closed)."""
        if n and self._loop is not None:
            with contextlib.suppress(RuntimeError):  # the loop closed: the server is gone, and its budget
                self._loop.call_soon_threadsafe(self.release, n)

    def _take(self, n: int) -> None:
        self.held += n
        self.peak = max(self.peak, self.held)

    def _grant(self) -> None:
        while self._waiters and self.held + self._waiters[0][0] <= self.capacity:
            n, future = self._waiters.popleft()
            self._take(n)
            future.set_result(None)

    def _leave(self, entry: tuple[int, asyncio.Future]) -> None:
        n, future = entry
        if future.done():  # granted just as the wait ended
            self.release(n)
            return
        future.cancel()
        with contextlib.suppress(ValueError):
            self._waiters.remove(entry)
        self._grant()  # it may have been first in line, holding back smaller requests behind it


class InFlight:
    """How many requests :class:`RequestGuard` has let through and not yet seen answered."""

    def __init__(self) -> None:
        self.count = 0


def _closing(status: int, detail: str) -> HTTPException:
    """An error answer after which the connection is closed (its client may still be sending)."""
    return HTTPException(status, detail, headers={"Connection": "close"})


class RequestGuard:
    """ASGI middleware: limits each HTTP request before the app sees it.

    - at most ``max_active`` requests to ``limited_paths`` in progress at once; more get 503 with
      ``Retry-After`` (other paths, and connections without a request, never count);
    - a body over ``max_body`` bytes gets 413 (from its Content-Length, or while it streams in);
    - a body not received whole within ``body_timeout`` seconds of the request's start gets 408.
    """

    def __init__(self, app: Any, *, max_body: int, body_timeout: float, max_active: int,
                 in_flight: InFlight | None = None, limited_paths: tuple[str, ...] = ("/caption",)):
        self.app = app
        self.max_body = max_body
        self.body_timeout = body_timeout
        self.max_active = max_active
        self.in_flight = in_flight or InFlight()  # requests to limited paths in progress
        self.limited_paths = limited_paths

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        limited = scope["path"] in self.limited_paths
        if limited and self.in_flight.count >= self.max_active:
            busy = JSONResponse({"detail": f"the server is busy ({self.in_flight.count} requests in progress, the limit is "
                                           f"{self.max_active}); retry shortly"},
                                status_code=503, headers={"Retry-After": "1"})
            return await busy(scope, receive, send)
        too_big = f"request body over {self.max_body / _MB:.1f} MB"
        for name, value in scope.get("headers", []):
            if name == b"content-length" and value.isdigit() and int(value) > self.max_body:
                answer = JSONResponse({"detail": too_big}, status_code=413, headers={"Connection": "close"})
                return await answer(scope, receive, send)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.body_timeout
        received = 0
        body_done = False

        async def guarded_receive() -> dict:
            nonlocal received, body_done
            if body_done:
                return await receive()
            try:
                message = await asyncio.wait_for(receive(), max(deadline - loop.time(), 0))
            except asyncio.TimeoutError:
                raise _closing(408, f"request body not received within {self.body_timeout:g} s") from None
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_body:
                    raise _closing(413, too_big)
                body_done = not message.get("more_body", False)
            return message

        if limited:
            self.in_flight.count += 1
        try:
            await self.app(scope, guarded_receive, send)
        finally:
            if limited:
                self.in_flight.count -= 1


def http_protocol(head_timeout: float) -> type:
    """uvicorn's h11 protocol class, closing connections whose request head is not complete within
    ``head_timeout`` seconds: counted from the connection's start, or from the first byte of a later request
    on a kept-alive connection (between requests, uvicorn's keep-alive timeout applies instead). A client
    that sent part of a head is answered 408 first."""
    from uvicorn.protocols.http.h11_impl import H11Protocol

    timeout_body = f"request head not received within {head_timeout:g} s".encode()
    timeout_answer = (b"HTTP/1.1 408 Request Timeout\r\ncontent-type: text/plain; charset=utf-8\r\n"
                      b"connection: close\r\ncontent-length: %d\r\n\r\n%s" % (len(timeout_body), timeout_body))

    class HeadTimeoutProtocol(H11Protocol):
        _head_timer: asyncio.TimerHandle | None = None
        _head_started = False  # some bytes of the current head arrived

        def connection_made(self, transport: Any) -> None:
            super().connection_made(transport)
            self._head_timer = self.loop.call_later(head_timeout, self._head_timed_out)

        def data_received(self, data: bytes) -> None:
            if self._between_requests():
                self._head_started = True
                if self._head_timer is None:  # the first bytes of a request on a kept-alive connection
                    self._head_timer = self.loop.call_later(head_timeout, self._head_timed_out)
            super().data_received(data)
            if not self._between_requests():  # the head is complete: the app's deadlines take over
                self._stop_head_timer()
                self._head_started = False

        def connection_lost(self, exc: Exception | None) -> None:
            self._stop_head_timer()
            super().connection_lost(exc)

        def _between_requests(self) -> bool:
            return self.cycle is None or self.cycle.response_complete

        def _stop_head_timer(self) -> None:
            if self._head_timer is not None:
                self._head_timer.cancel()
                self._head_timer = None

        def _head_timed_out(self) -> None:
            self._head_timer = None
            if self.transport.is_closing() or not self._between_requests():
                return
            if self._head_started:
                self.transport.write(timeout_answer)
            self.transport.close()

    return HeadTimeoutProtocol
