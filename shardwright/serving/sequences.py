"""The scheduler's records of a request: the request itself, its state inside the step scheduler
(serving/batching.py), and the token events an update hands back.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from shardwright.serving.sampling import SamplingParams, StopChecker

FinishReason = Literal["stop", "length", "cancelled"]
SeqStatus = Literal["waiting", "running", "spilled", "finished"]


@dataclass(frozen=True)
class Request:
    """One generation request: prompt token ids and how to sample (arrival order = add order)."""

    request_id: str
    prompt_ids: list[int]
    params: SamplingParams


@dataclass(eq=False)
class SequenceState:
    """A request inside the scheduler. `seq_id` is its arrival order (never reused)."""

    seq_id: int
    request: Request
    seed: int
    stop: StopChecker
    tokens: list[int]  # prompt + generated so far
    num_prompt_tokens: int
    num_scheduled: int = 0  # tokens dispatched to the workers
    num_computed: int = 0  # tokens whose K/V an updated plan has written
    in_flight: int = 0  # plans holding a chunk of this sequence, not yet updated
    last_chunk_samples: bool = False  # the newest in-flight chunk samples the next token
    status: SeqStatus = "waiting"
    arrival_step: int = 0  # the scheduler's next step id when it was added (for max_wait_steps)
    finish_reason: FinishReason | None = None
    paused: bool = False  # not scheduled until resumed (its caller stopped reading)
    last_step: int = -1  # the newest plan holding a chunk of it (spill victims: oldest first)

    @property
    def generated(self) -> list[int]:
        return self.tokens[self.num_prompt_tokens :]

    @property
    def num_kv_tokens(self) -> int:
        """Most K/V slots this sequence can ever need: the last new token is never fed back."""
        return self.num_prompt_tokens + self.request.params.max_tokens - 1


@dataclass(frozen=True)
class TokenEvent:
    """What one request got from an update: a token (None for a cancel), text, finish reason."""

    request_id: str
    token_id: int | None
    text: str = ""
    finish_reason: FinishReason | None = None
    logprob: tuple | None = None  # the token's (logprob, top) when its params ask (sampling.token_logprobs)
