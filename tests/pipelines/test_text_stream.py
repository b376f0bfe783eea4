"""TextStream: a call run in a task whose text is queued, so a surface can wait for the first
piece (or the error) before it commits to a 200."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import pytest

from app.pipelines.text_stream import TextStream

Put = Callable[[str], Awaitable[None]]


async def collect(stream: TextStream[str]) -> list[str]:
    return [text async for text in stream.texts()]


async def test_an_error_before_any_text_is_raised_by_start() -> None:
    async def run(put: Put) -> str:
        await asyncio.sleep(0)
        raise LookupError("refused before the first token")

    stream: TextStream[str] = TextStream(run)
    with pytest.raises(LookupError, match="refused"):
        await stream.start()


async def test_texts_come_in_order_then_the_result() -> None:
    async def run(put: Put) -> str:
        for piece in ("one ", "two ", "three"):
            await put(piece)
            await asyncio.sleep(0.001)
        return "done"

    stream: TextStream[str] = TextStream(run)
    await stream.start()
    assert await collect(stream) == ["one ", "two ", "three"]
    assert await stream.result() == "done"


async def test_an_error_after_text_is_raised_by_result() -> None:
    async def run(put: Put) -> str:
        await put("half an ans")
        raise ConnectionError("cut")

    stream: TextStream[str] = TextStream(run)
    await stream.start()  # the first text arrived: no error yet
    assert await collect(stream) == ["half an ans"]
    with pytest.raises(ConnectionError, match="cut"):
        await stream.result()


async def test_a_call_without_text_starts_and_ends() -> None:
    async def run(put: Put) -> str:
        return "nothing to say"

    stream: TextStream[str] = TextStream(run)
    await stream.start()
    assert await collect(stream) == []
    assert await stream.result() == "nothing to say"


async def test_close_stops_a_running_call() -> None:
    cancelled = asyncio.Event()

    async def run(put: Put) -> str:
        await put("first")
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            cancelled.set()
            raise
        return "never"

    stream: TextStream[str] = TextStream(run)
    await stream.start()
    await asyncio.wait_for(stream.close(), 2)
    assert cancelled.is_set()
    with pytest.raises(asyncio.CancelledError):
        await stream.result()
    await stream.close()  # a second close is harmless


async def test_close_after_the_end_keeps_the_result() -> None:
    async def run(put: Put) -> str:
        await put("all")
        return "finished"

    stream: TextStream[str] = TextStream(run)
    await stream.start()
    assert await collect(stream) == ["all"]
    await stream.close()
    assert await stream.result() == "finished"
