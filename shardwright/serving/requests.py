"""What a caller holds for one request: a stream of tokens, and the final output.

The engine's control thread pushes events; callers iterate synchronously (`for token in
stream`) or asynchronously (`async for token in stream`), or wait for `result()`.
"""

from __future__ import annotations

import asyncio
import queue
import threading
from collections.abc import Callable
from dataclasses import dataclass, field


class RequestFailed(RuntimeError):
    """The request could not complete; the message says why (e.g. which worker died)."""


@dataclass
class RequestOutput:
    request_id: str
    prompt_ids: list[int]
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    finish_reason: str | None = None  # 'stop' | 'length' | 'cancelled'
    # With SamplingParams.logprobs: logprobs[i] = (token_ids[i]'s logprob, ((id, logprob) top...)).
    logprobs: list[tuple] = field(default_factory=list)


_DONE = object()


class RequestStream:
    """Tokens of one request as they are produced, then its RequestOutput."""

    def __init__(self, request_id: str, prompt_ids: list[int], decode: Callable[[list[int]], str]) -> None:
        self.request_id = request_id
        self.output = RequestOutput(request_id, list(prompt_ids))
        self._decode = decode
        self._queue: queue.Queue = queue.Queue()
        self._done = threading.Event()
        self._error: str | None = None
        self._text = ""
        self._on_read: Callable[[str], None] | None = None
        self._drain = False  # result() was called: the output collects everything, nothing is unread

    # -- producer side (the engine thread) --
    def push(self, event) -> None:
        """Take one TokenEvent (token id, text delta, finish reason) from the scheduler."""
        if event.token_id is not None:
            self.output.token_ids.append(event.token_id)
            if getattr(event, "logprob", None) is not None:
                self.output.logprobs.append(event.logprob)
        if event.token_id is not None or event.text:
            self._queue.put((event.token_id, event.text))
        self._text += event.text
        if event.finish_reason is not None:
            self.finish(event.finish_reason)

    def finish(self, reason: str) -> None:
        if self._done.is_set():
            return
        self.output.finish_reason = reason
        self.output.text = self._text  # the scheduler emits text deltas (stop strings cut)
        self._done.set()
        self._queue.put(_DONE)

    def fail(self, message: str) -> None:
        if self._done.is_set():
            return
        self._error = message
        self._done.set()
        self._queue.put(_DONE)

    def watch_reads(self, on_read: Callable[[str], None]) -> None:
        """Back-pressure: call `on_read(request_id)` whenever the caller takes events."""
        self._on_read = on_read

    @property
    def unread(self) -> int:
        """Events pushed and not yet taken by the caller (0 once result() is waited on)."""
        return 0 if self._drain else self._queue.qsize()

    def _read(self) -> None:
        if self._on_read is not None:
            self._on_read(self.request_id)

    # -- consumer side --
    @property
    def done(self) -> bool:
        return self._done.is_set()

    def result(self, timeout_s: float | None = None) -> RequestOutput:
        """Wait for the request to finish; raises RequestFailed if it failed."""
        if not self._drain:
            self._drain = True
            self._read()
        if not self._done.wait(timeout_s):
            raise TimeoutError(f"{self.request_id} did not finish within {timeout_s} s")
        if self._error is not None:
            raise RequestFailed(self._error)
        return self.output

    @property
    def error(self) -> str | None:
        """Why the request failed, once it has (None while it runs or when it finished well)."""
        return self._error if self._done.is_set() else None

    def take(self, timeout_s: float | None = None) -> tuple[list[tuple[int | None, str]], bool]:
        """Every (token id or None, text delta) ready now, waiting up to `timeout_s` for the first,
        and whether the request is done (all its events taken). For relaying a stream in batches."""
        items: list = []
        try:
            item = self._queue.get(timeout=timeout_s)
            while True:
                if item is _DONE:
                    self._queue.put(_DONE)  # later readers see the end too
                    return items, True
                items.append(item)
                item = self._queue.get_nowait()
        except queue.Empty:
            return items, False
        finally:
            self._read()

    def events(self, timeout_s: float | None = None):
        """(token id or None, text delta) pairs as they are produced; raises RequestFailed.

        With `timeout_s`, raises TimeoutError when no event arrives within that many seconds.
        """
        while (item := self.next_event(timeout_s)) is not None:
            yield item

    def next_event(self, timeout_s: float | None = None):
        """The next (token id or None, text delta) pair, or None once the request is finished;
        raises RequestFailed, or TimeoutError when nothing arrives within `timeout_s`."""
        try:
            item = self._queue.get(timeout=timeout_s)
        except queue.Empty as err:
            raise TimeoutError(f"{self.request_id}: no token within {timeout_s} s") from err
        self._read()
        if item is _DONE:
            if self._error is not None:
                raise RequestFailed(self._error)
            return None
        return item

    def __iter__(self):
        """Token ids as they are produced."""
        return (token for token, _ in self.events() if token is not None)

    async def __aiter__(self):
        while True:
            item = await asyncio.to_thread(self._queue.get)
            self._read()
            if item is _DONE:
                if self._error is not None:
                    raise RequestFailed(self._error)
                return
            if item[0] is not None:
                yield item[0]
