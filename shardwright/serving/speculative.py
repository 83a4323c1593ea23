"""Speculative decoding: proposers and the verification of proposed (draft) tokens.

A running sequence whose next token is being decoded carries, instead of its one last token,
that token followed by k draft tokens d_1..d_k (one chunk of k + 1 query tokens, consecutive
positions, slots in its own blocks). The target model runs the chunk in one step; its logits at
the k + 1 positions verify the drafts (`verify_chunk`) and the step returns, per such sequence,
the accepted drafts and one more token of the target's own: at the first rejection the target's
replacement, or, when all k are accepted, the bonus token after d_k. K/V written for rejected
drafts are overwritten later (the sequence's length rolls back to the accepted tokens).

Proposers:
- n-gram prompt lookup (`propose_ngram`, controller side, pure Python): the last n tokens
  (n = max_n down to min_n) are looked up in the sequence's own history (prompt and generated),
  the most recent earlier occurrence wins, and the k tokens that followed it are proposed.
- a draft model (BiLD, Kim et al. 2023, "Speculative Decoding with Big Little Decoder"): the small
  model proposes up to k tokens, stopping early (BiLD's *fallback* policy) once its most likely
  token's probability falls below `fallback_threshold`; see `draft_model.py` for where it runs.

Guarantees of `verify_chunk` (tests/serving/test_speculative.py):
- greedy rows: the output is exactly plain greedy decoding's: a draft is accepted iff it equals
  the target's argmax at that position (penalties applied over the history as it would be);
- sampled rows with a deterministic draft (n-gram lookup, or a greedy draft model): the target
  draws its own seeded token at each position, with the very uniform number plain decoding uses
  (`sampling.uniform(seed, step)`), and a draft is accepted iff it equals that draw. This is
  rejection sampling with a point mass q = δ(d): acceptance probability p(d) = min(1, p(d)/q(d)),
  and on rejection the draw is distributed as normalize(max(0, p - q)) = p restricted to tokens
  != d; so the output equals plain seeded decoding token for token, not only in distribution;
- sampled rows with a sampled draft model (draft distribution q given): standard speculative
  rejection sampling (Leviathan et al. 2023; Chen et al. 2023): accept d with probability
  min(1, p(d)/q(d)), else draw from normalize(max(0, p - q)); all accepted -> a draw from p. The
  output is distributed exactly as the target's p (after temperature, top-k, top-p); it is seeded
  from (seed, step) with separate streams, so reproducible, but not the same tokens as plain
  decoding. The chi-square test checks the distribution;
- BiLD's *rollback* policy (`rollback_threshold`, off by default) trades exactness for
  acceptance as the paper does: a draft d is kept while the target's cross-entropy at it,
  -log p_target(d), is at most the threshold; at the first position past it the target's own
  token replaces it. With a rollback threshold outputs are no longer those of plain decoding.

Penalties, stop rules and max_tokens apply per accepted token: the scheduler appends the
returned tokens one by one and stops at the first stop (later ones are dropped).
Requests that ask for logprobs are never given drafts (their tokens take the plain path).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from shardwright.serving.sampling import (SamplingParams, apply_penalties, filtered_probs, sample_tokens, splitmix64,
                                          uniform)

ACCEPT_STREAM = 0xACCE97  # uniform(seed ^ splitmix64(ACCEPT_STREAM), step): accept / reject draws
DRAFT_STREAM = 0xD4AF7  # the draft model's own sampling draws


def stream_seed(seed: int, stream: int) -> int:
    """A seed for another independent random stream of the same request."""
    return seed ^ splitmix64(stream)


# ---------------------------------------------------------------------------------- proposers
def propose_ngram(tokens: Sequence[int], k: int, max_n: int = 3, min_n: int = 1) -> list[int]:
    """Up to k tokens that followed an earlier occurrence of the last n tokens: the most recent
    occurrence followed by k tokens, else the most recent one (followed by fewer).

    n runs from max_n down to min_n; the first n with a match wins. [] when nothing matches or
    k < 1. Cost O(len(tokens) * n) per call.
    """
    size = len(tokens)
    if k < 1:
        return []
    for n in range(min(max_n, size - 1), min_n - 1, -1):
        suffix = list(tokens[size - n:])
        best: list[int] = []
        for start in range(size - n - 1, -1, -1):  # most recent first; the suffix itself excluded
            if tokens[start] == suffix[0] and list(tokens[start:start + n]) == suffix:
                follow = list(tokens[start + n:start + n + k])
                if len(follow) == k:
                    return follow
                best = best or follow
        if best:
            return best
    return []


@dataclass(frozen=True)
class NgramProposer:
    """Prompt lookup for the StepScheduler (its `Proposer`): at most `k` drafts per step."""

    k: int
    max_n: int = 3
    min_n: int = 1

    def propose(self, tokens: list[int], k: int) -> list[int]:
        return propose_ngram(tokens, min(k, self.k), self.max_n, self.min_n)


# ------------------------------------------------------------------------------ distributions
def draw(probs: torch.Tensor, u: float) -> int:
    """Inverse-CDF draw from `probs` [vocab] (need not sum to 1) at u in [0, 1); never a zero."""
    cdf = torch.cumsum(probs, dim=0)
    k = min(int(torch.searchsorted(cdf, torch.tensor([u * float(cdf[-1])], dtype=cdf.dtype), right=True)),
            probs.shape[0] - 1)
    while k > 0 and probs[k] == 0:
        k -= 1
    while probs[k] == 0 and k + 1 < probs.shape[0]:
        k += 1
    return k


def rejection_step(p: torch.Tensor, q: torch.Tensor, x: int, u_accept: float, u_draw: float) -> tuple[bool, int]:
    """One position of speculative rejection sampling: draft x ~ q; accept with probability
    min(1, p(x) / q(x)) (u_accept < that), else draw from normalize(max(0, p - q)) at u_draw.
    Returns (accepted, token). p, q: [vocab] probabilities."""
    px, qx = float(p[x]), float(q[x])
    if qx > 0 and u_accept < min(1.0, px / qx):
        return True, x
    residual = torch.clamp(p - q, min=0.0)
    if float(residual.sum()) <= 0.0:  # p == q up to rounding: the residual is empty, p itself is exact
        residual = p
    return False, draw(residual, u_draw)


# ------------------------------------------------------------------------------- verification
def verify_chunk(logits: torch.Tensor, draft: Sequence[int], params: SamplingParams, seed: int, step: int,
                 history: Sequence[int] | None = None, draft_probs: torch.Tensor | None = None,
                 rollback_threshold: float | None = None) -> list[int]:
    """The accepted drafts and the target's next token: 1 to k + 1 token ids.

    logits [k + 1, vocab]: the target's at the chunk's k + 1 positions (last token, d_1..d_k).
    `step` is the request's index of the token sampled from row 0. `history` (only needed with
    penalties) is the request's tokens up to and including the chunk's first token. `draft_probs`
    [k, vocab]: the draft model's distribution at each draft (None: a deterministic draft).
    See the module docstring for what is guaranteed in each case.
    """
    k = len(draft)
    if logits.shape[0] != k + 1:
        raise ValueError(f"verify_chunk: {logits.shape[0]} logits rows for {k} drafts; give k + 1 rows")
    if params.penalized:
        if history is None:
            raise ValueError("verify_chunk: penalised params need the request's history")
        rows = [apply_penalties(logits[j].to("cpu", torch.float64), list(history) + list(draft[:j]),
                                step + j, params) for j in range(k + 1)]
        logits = torch.stack(rows)
    plain = SamplingParams(**{**params.model_dump(), "presence_penalty": 0.0, "frequency_penalty": 0.0,
                              "repetition_penalty": 1.0}) if params.penalized else params
    if rollback_threshold is not None:
        return _verify_rollback(logits, draft, plain, seed, step, rollback_threshold)
    if draft_probs is None or plain.greedy:
        return _verify_point(logits, draft, plain, seed, step)
    return _verify_soft(logits, draft, draft_probs, plain, seed, step)


def _verify_point(logits: torch.Tensor, draft: Sequence[int], p: SamplingParams, seed: int, step: int) -> list[int]:
    k = len(draft)
    targets = sample_tokens(logits, [p] * (k + 1), [seed] * (k + 1), list(range(step, step + k + 1)))
    out = []
    for j, t in enumerate(targets):
        out.append(t)
        if j == k or t != draft[j]:
            return out
    return out


def _verify_soft(logits: torch.Tensor, draft: Sequence[int], draft_probs: torch.Tensor, p: SamplingParams,
                 seed: int, step: int) -> list[int]:
    accept_seed = stream_seed(seed, ACCEPT_STREAM)
    out = []
    for j, x in enumerate(draft):
        target = filtered_probs(logits[j], p)
        q = draft_probs[j].to("cpu", torch.float64)
        ok, token = rejection_step(target, q, int(x), uniform(accept_seed, step + j), uniform(seed, step + j))
        out.append(token)
        if not ok:
            return out
    k = len(draft)
    out.append(sample_tokens(logits[k:], [p], [seed], [step + k])[0])
    return out


def _verify_rollback(logits: torch.Tensor, draft: Sequence[int], p: SamplingParams, seed: int, step: int,
                     threshold: float) -> list[int]:
    """BiLD's rollback: keep d_j while -log p_target(d_j) <= threshold (the target's softmax at
    temperature 1, penalties applied); at the first past it, the target's own token."""
    k = len(draft)
    nll = -torch.log_softmax(logits.to("cpu", torch.float64), dim=-1)
    out = []
    for j in range(k):
        if float(nll[j, int(draft[j])]) > threshold:
            return out + sample_tokens(logits[j:j + 1], [p], [seed], [step + j])
        out.append(int(draft[j]))
    return out + sample_tokens(logits[k:], [p], [seed], [step + k])


def verify_rows(logits: torch.Tensor, params: list[SamplingParams], seeds: list[int], steps: list[int],
                drafts: list[Sequence[int]], histories: Sequence[Sequence[int]] | None = None,
                draft_probs: list[torch.Tensor | None] | None = None,
                rollback_threshold: float | None = None) -> list[int | list[int]]:
    """The last stage's sampling for a step with drafts: logits [sum(len(d) + 1), vocab], rows of
    each sampled chunk in order (its k + 1 positions). A row without drafts gets one token id (as
    `sample_tokens`), a row with drafts the list `verify_chunk` returns. `histories[i]` is the
    request's tokens up to the chunk's first token (`StepMessage.histories` minus the drafts)."""
    plain = [i for i, d in enumerate(drafts) if not d]
    starts, at = [], 0
    for d in drafts:
        starts.append(at)
        at += len(d) + 1
    if at != logits.shape[0]:
        raise ValueError(f"verify_rows: {logits.shape[0]} logits rows, the drafts need {at}")
    out: list[int | list[int]] = [0] * len(drafts)
    if plain:
        rows = logits[[starts[i] for i in plain]]
        hist = [histories[i] for i in plain] if histories is not None else None
        for i, t in zip(plain, sample_tokens(rows, [params[i] for i in plain], [seeds[i] for i in plain],
                                             [steps[i] for i in plain], hist)):
            out[i] = t
    for i, d in enumerate(drafts):
        if d:
            out[i] = verify_chunk(logits[starts[i]:starts[i] + len(d) + 1], d, params[i], seeds[i], steps[i],
                                  histories[i] if histories is not None else None,
                                  draft_probs[i] if draft_probs is not None else None, rollback_threshold)
    return out
