"""Each request's head (request line + headers) bounded in size and in the time it takes to arrive.

This sits in uvicorn's HTTP protocol, not in an ASGI middleware, because the app sees a request
only once the server has read all of its headers into memory: uvicorn with httptools (its
default parser) bounds neither their size nor their time, so one 64 MiB header was read and
answered, and a client sending a byte a second held its connection for ever.

The protocols below feed the parser at most MAX_HEADER_BYTES of a request's head: a head that
does not end within them is answered 431 and the connection closed, whatever is still unread
(a request line too long counts the same and gets 431 too, not 414: one bound, one answer).
A clock runs from a request's first byte (for a connection's first request, from its opening,
so a connection that sends nothing is closed too) to the end of its headers: when
HEADER_READ_TIMEOUT_SECONDS pass first, the connection gets 408 (or is just closed, when it sent
nothing or a response to an earlier request is still being written) and is closed. A request's
body, its handling and the wait between keep-alive requests (uvicorn's `timeout_keep_alive`) are
not timed here.

One approximation: with pipelining, the start of a request that arrives in the same read as the
end of the one before is not counted (at most one read of the socket, or one MAX_HEADER_BYTES
slice), so the bound can be passed by that much, never without limit.
"""

from __future__ import annotations

import abc
import asyncio
import functools
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any

import h11
from uvicorn.config import Config
from uvicorn.protocols.http.h11_impl import H11Protocol
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
from uvicorn.server import ServerState

log = logging.getLogger("cxrelay.http")


@dataclass(frozen=True)
class HeaderLimits:
    max_bytes: int
    read_timeout_seconds: float


def bounded_http_protocol(limits: HeaderLimits) -> Callable[..., asyncio.Protocol]:
    """uvicorn's `http` option: the protocol uvicorn's "auto" picks here (httptools, a dependency
    through uvicorn[standard]) with `limits`. A partial of a module-level class, so that it
    pickles to the worker processes when WORKERS > 1."""
    return functools.partial(HttpToolsWithHeaderLimits, limits=limits)


class _HeaderGuard(asyncio.Protocol, metaclass=abc.ABCMeta):
    """The byte count and the clock, over either of uvicorn's HTTP/1.1 protocols: listed first
    among a class's bases, its methods wrap the protocol's. A subclass says when the parser is
    reading a head, and gives a marker that changes whenever a head has been read."""

    transport: asyncio.Transport
    loop: asyncio.AbstractEventLoop
    server_state: ServerState
    client: tuple[str, int] | None
    cycle: Any  # the protocol's current request-response cycle (each protocol has its own class)

    def __init__(
        self,
        config: Config,
        server_state: ServerState,
        app_state: dict[str, Any],
        _loop: asyncio.AbstractEventLoop | None = None,
        *,
        limits: HeaderLimits,
    ) -> None:
        # the uvicorn protocol after this class in the MRO takes the arguments
        super().__init__(config, server_state, app_state, _loop)  # type: ignore[call-arg]
        self._limits = limits
        self._head_bytes = 0
        self._head_clock: asyncio.TimerHandle | None = None

    @abc.abstractmethod
    def _reading_head(self) -> bool: ...

    @abc.abstractmethod
    def _heads_read_marker(self) -> object: ...

    def _answering(self) -> bool:
        """A response to an earlier request is under way: nothing else may be written."""
        return self.cycle is not None and not self.cycle.response_complete

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        self._start_head_clock()

    def connection_lost(self, exc: Exception | None) -> None:
        self._stop_head_clock()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        while data and self._reading_head():
            self._start_head_clock()
            room = self._limits.max_bytes - self._head_bytes
            if room <= 0:
                self._refuse(
                    HTTPStatus.REQUEST_HEADER_FIELDS_TOO_LARGE,
                    f"request line and headers exceed the {self._limits.max_bytes}-byte limit",
                )
                return
            piece, data = data[:room], data[room:]
            self._head_bytes += len(piece)
            marker = self._heads_read_marker()
            super().data_received(piece)
            upgraded = self.transport.get_protocol() is not self  # e.g. to a WebSocket
            if upgraded or self._heads_read_marker() != marker:
                self._stop_head_clock()
                self._head_bytes = 0
            if upgraded or self.transport.is_closing():
                return  # like uvicorn, nothing after a WebSocket handshake's head is kept
        if data:
            super().data_received(data)

    def _start_head_clock(self) -> None:
        if self._head_clock is None:
            self._head_clock = self.loop.call_later(
                self._limits.read_timeout_seconds, self._head_too_slow
            )

    def _stop_head_clock(self) -> None:
        if self._head_clock is not None:
            self._head_clock.cancel()
            self._head_clock = None

    def _head_too_slow(self) -> None:
        self._head_clock = None
        if self.transport.is_closing():
            return
        if self._head_bytes == 0:  # a connection that never sent a request: nobody to answer
            self._log_refusal("connection sent no request in time", None)
            self.transport.close()
            return
        self._refuse(
            HTTPStatus.REQUEST_TIMEOUT,
            f"request headers not received within {self._limits.read_timeout_seconds:g} s",
        )

    def _refuse(self, status: HTTPStatus, detail: str) -> None:
        """Answer `status` and close, unread bytes and all: reading them is what is refused."""
        self._stop_head_clock()
        answered = not self._answering()
        if answered:
            body = json.dumps({"detail": detail}).encode()
            lines = [f"HTTP/1.1 {status.value} {status.phrase}".encode()]
            lines += [name + b": " + value for name, value in self.server_state.default_headers]
            lines += [
                b"content-type: application/json",
                b"content-length: " + str(len(body)).encode(),
                b"connection: close",
            ]
            self.transport.write(b"\r\n".join(lines) + b"\r\n\r\n" + body)
        self._log_refusal(detail, status if answered else None)
        self.transport.close()

    def _log_refusal(self, message: str, status: HTTPStatus | None) -> None:
        """One line per connection closed here: the app never sees these, so its access log
        does not either."""
        remote = self.client[0] if self.client else None  # as cxrelay.access names it
        log.info(message, extra={"status": status and status.value, "remote": remote})


class HttpToolsWithHeaderLimits(_HeaderGuard, HttpToolsProtocol):
    """uvicorn's httptools protocol with HeaderLimits. Its parser callbacks say where a head
    ends (headers complete) and where the next one may begin (message complete)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._in_head = True
        self._heads_read = 0

    def _reading_head(self) -> bool:
        return self._in_head

    def _heads_read_marker(self) -> object:
        return self._heads_read

    def on_headers_complete(self) -> None:
        self._in_head = False
        self._heads_read += 1
        super().on_headers_complete()

    def on_message_complete(self) -> None:
        self._in_head = True
        super().on_message_complete()


class H11WithHeaderLimits(_HeaderGuard, H11Protocol):
    """uvicorn's h11 protocol (`http="h11"`) with HeaderLimits. h11 reads one request at a time
    (it pauses on a pipelined one) and makes a new response cycle for each head it reads. h11
    also refuses (400) a head over `h11_max_incomplete_event_size` (16 KiB unless set), so that
    option must be at least `max_bytes` for the 431 to be the answer."""

    def _reading_head(self) -> bool:
        return self.conn.their_state is h11.IDLE

    def _heads_read_marker(self) -> object:
        return self.cycle
