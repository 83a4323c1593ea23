"""Sampling parameters, the seeded token sampler and the stop rules of one request.

Reproducibility: a seeded row's draw depends only on (its logits, params, seed, step), where
`step` is the index of the token being sampled within its request (0 for the first new token).
The uniform number comes from a counter-based hash (splitmix64) of (seed, step), and every row
is filtered and sampled on its own in float64 on the CPU, so the token does not depend on batch
composition, batch position or which process samples it.

Requests without a seed are given one by the engine (the StepScheduler draws it with
`derive_seed` from its own base seed, or from the OS when that is unset): unseeded requests are
random across runs unless the engine's base seed is fixed.

Stop rules: `StopChecker` follows one request token by token (eos / stop ids / stop strings /
max_tokens) and yields the text to emit, holding back any tail that could still begin a stop
string; `check_stop` applies the same rules to a whole list of generated ids.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from pydantic import Field, field_validator

from shardwright.config import StrictModel

_MASK64 = (1 << 64) - 1
MAX_LOGPROBS = 20


class SamplingParams(StrictModel):
    """How one request draws its new tokens and when it stops. Immutable; unknown fields rejected."""

    max_tokens: int = Field(16, description="Most new tokens to generate (>= 1); finish reason 'length'.")
    temperature: float = Field(
        0.0, description="Softmax temperature (>= 0); 0 means greedy argmax, lowest id on ties."
    )
    top_k: int = Field(0, description="Keep the k most likely tokens (>= 0); 0 turns top-k off.")
    top_p: float = Field(
        1.0, description="Nucleus: keep the smallest most-likely set of mass >= top_p (0 < p <= 1)."
    )
    seed: int | None = Field(
        None, description="Seed in [0, 2**64) for reproducible sampling; None lets the engine draw one."
    )
    stop: list[str] = Field(
        default_factory=list, description="Stop strings: output text is truncated before the first."
    )
    stop_token_ids: list[int] = Field(
        default_factory=list, description="Token ids that end generation (the id is kept in tokens)."
    )
    ignore_eos: bool = Field(False, description="Keep generating past the model's end-of-sequence ids.")
    logprobs: int | None = Field(
        None, ge=0, le=MAX_LOGPROBS, description="Return each new token's log-probability and those of the "
                                                 "this many most likely tokens (0: the chosen one only); None is off."
    )
    presence_penalty: float = Field(
        0.0, ge=-2.0, le=2.0, description="Subtract this from the logit of every token already generated."
    )
    frequency_penalty: float = Field(
        0.0, ge=-2.0, le=2.0, description="Subtract this times its count so far from each generated token's logit."
    )
    repetition_penalty: float = Field(
        1.0, gt=0.0, le=10.0, description="Divide positive (multiply negative) logits of prompt and generated "
                                          "tokens by this (CTRL); 1 is off."
    )

    @field_validator("max_tokens")
    @classmethod
    def _check_max_tokens(cls, v: int) -> int:
        if v < 1:
            raise ValueError(f"max_tokens={v} must be >= 1: ask for at least one new token")
        return v

    @field_validator("temperature")
    @classmethod
    def _check_temperature(cls, v: float) -> float:
        if not v >= 0 or v == float("inf"):
            raise ValueError(f"temperature={v} must be a finite number >= 0; use 0 for greedy")
        return v

    @field_validator("top_k")
    @classmethod
    def _check_top_k(cls, v: int) -> int:
        if v < 0:
            raise ValueError(f"top_k={v} must be >= 0; use 0 to turn top-k off")
        return v

    @field_validator("top_p")
    @classmethod
    def _check_top_p(cls, v: float) -> float:
        if not 0 < v <= 1:
            raise ValueError(f"top_p={v} must be in (0, 1]; use 1.0 to turn nucleus sampling off")
        return v

    @field_validator("seed")
    @classmethod
    def _check_seed(cls, v: int | None) -> int | None:
        if v is not None and not 0 <= v <= _MASK64:
            raise ValueError(f"seed={v} must be in [0, 2**64); reduce it modulo 2**64")
        return v

    @field_validator("stop")
    @classmethod
    def _check_stop(cls, v: list[str]) -> list[str]:
        if any(s == "" for s in v):
            raise ValueError(f"stop={v!r} contains an empty string, which would stop at once; remove it")
        return v

    @field_validator("stop_token_ids")
    @classmethod
    def _check_stop_ids(cls, v: list[int]) -> list[int]:
        bad = [t for t in v if t < 0]
        if bad:
            raise ValueError(f"stop_token_ids has negative ids {bad}; token ids are >= 0")
        return v

    @property
    def greedy(self) -> bool:
        """True when the draw is an argmax (temperature 0 or top_k 1), after any penalties."""
        return self.temperature == 0.0 or self.top_k == 1

    @property
    def penalized(self) -> bool:
        """True when the logits depend on the tokens so far (a penalty is on)."""
        return self.presence_penalty != 0.0 or self.frequency_penalty != 0.0 or self.repetition_penalty != 1.0


# ------------------------------------------------------------------ counter-based random numbers
def splitmix64(x: int) -> int:
    """The splitmix64 finaliser: a bijective 64-bit mix (Steele et al., 2014)."""
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def uniform(seed: int, step: int) -> float:
    """A uniform number in [0, 1) that depends only on (seed, step): 53 bits of a double hash."""
    return (splitmix64((seed & _MASK64) ^ splitmix64(step & _MASK64)) >> 11) * 2.0**-53


def derive_seed(base_seed: int | None, index: int) -> int:
    """The seed the engine gives an unseeded request: a hash of (base_seed, index), or OS entropy."""
    if base_seed is None:
        return secrets.randbits(64)
    return splitmix64((base_seed & _MASK64) ^ splitmix64(index ^ 0x5EED))


# ------------------------------------------------------------------------------------ sampler
def apply_penalties(row: torch.Tensor, history: Sequence[int], num_generated: int, p: SamplingParams) -> torch.Tensor:
    """`row` [vocab] with p's penalties applied, as vLLM and the OpenAI API define them.

    `history` is the request's tokens so far (prompt, then `num_generated` generated ones).
    Repetition (CTRL, Keskar et al. 2019) over prompt and generated tokens: a positive logit is
    divided by the penalty, a negative one multiplied. Then over generated tokens only: minus
    frequency_penalty times the token's count, minus presence_penalty once if it occurs.
    """
    out = row.clone()
    if p.repetition_penalty != 1.0 and len(history):
        seen = torch.unique(torch.tensor(list(history), dtype=torch.long))
        vals = out[seen]
        out[seen] = torch.where(vals > 0, vals / p.repetition_penalty, vals * p.repetition_penalty)
    generated = list(history[len(history) - num_generated:]) if num_generated > 0 else []
    if generated and (p.frequency_penalty != 0.0 or p.presence_penalty != 0.0):
        counts = torch.bincount(torch.tensor(generated, dtype=torch.long), minlength=out.shape[0]).to(out.dtype)
        out -= p.frequency_penalty * counts + p.presence_penalty * (counts > 0).to(out.dtype)
    return out


def sample_tokens(
    logits: torch.Tensor, params: list[SamplingParams], seeds: list[int], steps: list[int],
    histories: Sequence[Sequence[int]] | None = None,
) -> list[int]:
    """One token id per row of `logits` [batch, vocab] (any float dtype, any device).

    Rows with penalties first get `apply_penalties` (in float64 on the CPU) over `histories[i]`,
    the request's tokens so far, of which the last `steps[i]` were generated.
    Greedy rows (temperature 0 or top_k 1) take the argmax, lowest id on ties. Other rows, each
    on its own in float64 on the CPU: weights exp((logits - max) / temperature); keep the top_k
    tokens; keep the top_p nucleus (the shortest prefix, in order of weight with ties to the
    lowest id, whose share of the kept mass reaches top_p); then inverse CDF at
    u = uniform(seed, step). Cost per row O(vocab) except for top_p over a flat distribution
    (a full sort). Raises ValueError on shape mismatches or NaN / infinite row maxima.
    """
    _check_inputs(logits, params, seeds, steps)
    if logits.shape[0] == 0:
        return []
    logits = logits.detach()
    maxima, first_max = logits.max(dim=-1)  # one pass; the index is the first (lowest) maximal id
    if not bool(torch.isfinite(maxima).all()):
        bad = torch.nonzero(~torch.isfinite(maxima)).flatten().tolist()
        raise ValueError(f"logits rows {bad} have a NaN or infinite maximum; check the model output")
    out = first_max.tolist()
    todo = [i for i, p in enumerate(params) if not p.greedy or p.penalized]
    if todo and histories is None and any(params[i].penalized for i in todo):
        raise ValueError("penalised rows need the requests' token histories; pass histories")
    if todo:
        rows = logits[todo].to("cpu", torch.float64)  # one exact copy; rows stay independent
        for row, i in zip(rows, todo):
            p = params[i]
            if p.penalized:
                row = apply_penalties(row, histories[i], steps[i], p)
            out[i] = int(row.max(dim=0).indices) if p.greedy else _sample_row(row, p, uniform(seeds[i], steps[i]))
    return out


def filtered_probs(row: torch.Tensor, p: SamplingParams) -> torch.Tensor:
    """The distribution `sample_tokens` draws from for one (penalised) row [vocab], float64:
    temperature, then top-k and top-p, renormalised; a one-hot at the argmax for greedy params."""
    row = row.to("cpu", torch.float64)
    if p.greedy:
        out = torch.zeros_like(row)
        out[int(row.max(dim=0).indices)] = 1.0
        return out
    scaled = (row - row.max()) / p.temperature
    weights = torch.exp(scaled)
    if p.top_k or p.top_p < 1.0:
        ids = _kept_ids(scaled, weights, p)
        kept = torch.zeros_like(weights)
        kept[ids] = weights[ids]
        weights = kept
    return weights / weights.sum()


TokenLogprob = tuple[float, tuple[tuple[int, float], ...]]  # (chosen's, ((id, logprob) most likely first))


def token_logprobs(logits: torch.Tensor, tokens: list[int], params: list[SamplingParams]
                   ) -> list[TokenLogprob | None]:
    """Per row, None unless its params ask for logprobs: the chosen token's log-probability and
    the `logprobs` most likely tokens', from the log-softmax of the model's raw logits (before
    temperature, penalties and filtering, as vLLM reports them by default), in float64."""
    out: list[TokenLogprob | None] = [None] * len(tokens)
    rows = [i for i, p in enumerate(params) if p.logprobs is not None]
    if not rows:
        return out
    lsm = torch.log_softmax(logits[rows].detach().to("cpu", torch.float64), dim=-1)
    for row, i in zip(lsm, rows):
        k = params[i].logprobs
        top = _top(row, k) if k else torch.empty(0, dtype=torch.long)
        out[i] = (float(row[tokens[i]]), tuple((int(t), float(row[t])) for t in top))
    return out


def _check_inputs(
    logits: torch.Tensor, params: list[SamplingParams], seeds: list[int], steps: list[int]
) -> None:
    if logits.dim() != 2:
        raise ValueError(f"logits must be [batch, vocab], got shape {tuple(logits.shape)}")
    batch = logits.shape[0]
    if not len(params) == len(seeds) == len(steps) == batch:
        raise ValueError(
            f"logits has {batch} rows but params/seeds/steps have "
            f"{len(params)}/{len(seeds)}/{len(steps)} entries; give one of each per row"
        )


def _sample_row(row: torch.Tensor, p: SamplingParams, u: float) -> int:
    """Inverse-CDF draw from one row [vocab] float64 under p's temperature, top_k and top_p."""
    scaled = (row - row.max()) / p.temperature  # max first: tiny temperatures cannot overflow
    weights = torch.exp(scaled)  # unnormalised probabilities, the largest is 1
    ids = _kept_ids(scaled, weights, p) if p.top_k or p.top_p < 1.0 else None
    kept = weights if ids is None else weights[ids]
    cdf = torch.cumsum(kept, dim=0)
    target = torch.tensor([u * float(cdf[-1])], dtype=cdf.dtype)
    k = min(int(torch.searchsorted(cdf, target, right=True)), kept.shape[0] - 1)
    while k > 0 and kept[k] == 0:  # never land on a zero-weight token through rounding
        k -= 1
    return k if ids is None else int(ids[k])


def _kept_ids(scaled: torch.Tensor, weights: torch.Tensor, p: SamplingParams) -> torch.Tensor:
    """Ids kept by top_k then top_p, in canonical order (weight descending, lowest id first)."""
    vocab = scaled.shape[0]
    k = p.top_k if 0 < p.top_k < vocab else vocab
    if p.top_p >= 1.0:
        return _top(scaled, k)
    mass = p.top_p * float(weights.sum() if k == vocab else weights[_top(scaled, k)].sum())
    n = min(k, 64)
    while True:  # widen the candidate prefix until the nucleus ends inside it
        ids = _top(scaled, n)
        w = weights[ids]
        keep = max(int(((torch.cumsum(w, dim=0) - w) < mass).sum()), 1)
        if keep < n or n == k:
            return ids[:keep]
        n = min(k, n * 8)


def _top(scaled: torch.Tensor, n: int) -> torch.Tensor:
    """The first n ids in canonical order, in O(vocab) (torch.topk does not order ties by id)."""
    if n >= scaled.shape[0]:
        return torch.sort(scaled, descending=True, stable=True).indices
    threshold = torch.topk(scaled, n, sorted=False).values.min()
    above = torch.nonzero(scaled > threshold).flatten()
    ties = torch.nonzero(scaled == threshold).flatten()[: n - above.shape[0]]
    ids = torch.cat([above, ties])  # each part ascending; stable sort keeps lowest id first
    return ids[torch.sort(scaled[ids], descending=True, stable=True).indices]


# ------------------------------------------------------------------------------- stop rules
FinishReason = Literal["stop", "length"]
Decode = Callable[[list[int]], str]


@dataclass(frozen=True)
class StopDecision:
    """After a token: whether the request is finished, why, and the text to emit now."""

    finished: bool
    reason: FinishReason | None
    text: str


_RUNNING = StopDecision(False, None, "")


class _Detokenizer:
    """Incremental detokenization over a sliding window (the TGI / vLLM prefix-offset scheme).

    Each push decodes only the last few ids, so a request costs O(1) decode work per token.
    Text that ends in U+FFFD (an incomplete UTF-8 sequence) is held until the next token.
    """

    def __init__(self, decode: Decode, context_ids: Sequence[int]) -> None:
        self._decode = decode
        self._ids = list(context_ids[-5:])  # a little prompt context for leading-space rules
        self._prefix = 0
        self._read = len(self._ids)

    def push(self, token: int) -> str:
        self._ids.append(token)
        before = self._decode(self._ids[self._prefix : self._read])
        after = self._decode(self._ids[self._prefix :])
        if len(after) <= len(before) or after.endswith("\ufffd"):
            return ""
        self._ids = self._ids[self._read :]
        self._prefix, self._read = 0, len(self._ids)
        return after[len(before) :]

    def flush(self) -> str:
        """Text of the held ids at the end of a request, incomplete characters included."""
        before = self._decode(self._ids[self._prefix : self._read])
        after = self._decode(self._ids[self._prefix :])
        return after[len(before) :] if len(after) > len(before) else ""


class StopChecker:
    """Applies one request's stop rules token by token.

    Rules, checked in this order for each new token: the token is an eos id (unless
    `ignore_eos`) or in `stop_token_ids` -> 'stop' (the id stays in the output ids, its text is
    not emitted); the decoded text now contains a stop string -> 'stop', text truncated before
    the earliest one; `max_tokens` tokens generated -> 'length'. While running, the longest tail
    of the text that is a prefix of some stop string is held back, so emitted text never has to
    be retracted. Without a `decode` callable no text is produced and stop strings are refused.
    """

    def __init__(self, params: SamplingParams, eos_ids: Sequence[int], decode: Decode | None = None,
                 context_ids: Sequence[int] = ()) -> None:
        if params.stop and decode is None:
            raise ValueError(f"stop={params.stop!r} needs a decode callable to match text; "
                             "give the scheduler the tokenizer's decode")
        eos = frozenset(() if params.ignore_eos else eos_ids)
        self._stop_ids = frozenset(params.stop_token_ids) | eos
        self._stops = tuple(params.stop)
        self._max_tokens = params.max_tokens
        self._detok = _Detokenizer(decode, context_ids) if decode is not None else None
        self._pending = ""  # decoded text not emitted yet
        self._count = 0
        self.reason: FinishReason | None = None

    def push(self, token: int) -> StopDecision:
        """Account for one generated token; raises ValueError once finished."""
        if self.reason is not None:
            raise ValueError(f"token {token} pushed after the request finished ({self.reason})")
        self._count += 1
        if token in self._stop_ids:
            return self._finish("stop", self._pending + self._flush())
        if self._detok is not None:
            self._pending += self._detok.push(token)
            cut = self._first_stop() if self._stops else None
            if cut is not None:
                return self._finish("stop", self._pending[:cut])
        if self._count >= self._max_tokens:
            return self._finish("length", self._pending + self._flush())
        return StopDecision(False, None, self._emit()) if self._pending else _RUNNING

    def _flush(self) -> str:
        return self._detok.flush() if self._detok is not None else ""

    def _first_stop(self) -> int | None:
        hits = [i for i in (self._pending.find(s) for s in self._stops) if i >= 0]
        return min(hits) if hits else None

    def _emit(self) -> str:
        """Emit the pending text except its longest tail that could still begin a stop string."""
        keep = len(self._pending) - self._held_tail()
        text, self._pending = self._pending[:keep], self._pending[keep:]
        return text

    def _held_tail(self) -> int:
        longest = max(map(len, self._stops), default=1) - 1
        for k in range(min(len(self._pending), longest), 0, -1):
            if any(s.startswith(self._pending[-k:]) for s in self._stops):
                return k
        return 0

    def _finish(self, reason: FinishReason, text: str) -> StopDecision:
        self.reason, self._pending = reason, ""
        return StopDecision(True, reason, text)


def check_stop(generated_ids: Sequence[int], params: SamplingParams, eos_ids: Sequence[int],
               decode: Decode | None = None) -> StopDecision:
    """Apply StopChecker's rules to a whole list of generated ids.

    Returns the first finish (ids after it are ignored) with the full text to emit, truncated
    before a matched stop string; or, when not finished, the text that is safe to emit so far.
    """
    checker, parts = StopChecker(params, eos_ids, decode), []
    for token in generated_ids:
        decision = checker.push(token)
        parts.append(decision.text)
        if decision.finished:
            return StopDecision(True, decision.reason, "".join(parts))
    return StopDecision(False, None, "".join(parts))
