"""The controller's step scheduler: continuous batching over a paged KV cache.

Each step the engine calls `schedule()` for a `StepPlan`, runs it on the workers, samples the
logits at `plan.sample_indices()` and calls `update(plan, sampled)`. A plan packs, with no
padding, decode tokens of running sequences (one each), then the rest of partly prefilled
prompts, then new requests admitted while their KV reservation fits, their prompts cut into
chunks that fill the step's prefill budget (chunked prefill): the step's token budget left after
the decode tokens, at most `max_prefill_tokens` (None: no cap). Waiting requests are admitted in
arrival order, or with `shortest_prompt_first` shortest prompt first (ties in arrival order), so
that a burst of requests gets the first tokens of its short prompts after a few small steps
instead of all at the end of one big one; a request waiting `max_wait_steps` steps or more goes
back to arrival order ahead of every younger one (no starvation).

Guarantees:
- a step never holds more than `max_tokens_per_step` tokens nor more than `max_running` sequences;
  since `max_tokens_per_step >= max_running`, every decode-ready sequence runs every step;
- an admitted sequence never runs out of KV blocks (it reserved prompt + max_tokens - 1 slots);
  the request next in admission order that does not fit yet blocks the others (so a long one
  that has waited max_wait_steps is not overtaken for ever by short ones that fit);
- a sequence is in at most one plan in flight: with pipeline parallelism (up to P plans in
  flight) a sequence is not scheduled again until `update` of its plan, when its next token is
  known (this also holds for prompt chunks that sample nothing) -- except with `lookahead`
  (async scheduling, one pipeline stage): a sequence whose one in-flight chunk samples its next
  token may be scheduled once more, its first token being that not-yet-known one
  (`SeqChunk.feedback`: the workers put in the token they sampled for it in the previous step).
  Only when that token will not be the last (max_tokens); if it turns out to stop the sequence,
  the extra chunk's work is dropped on update like a cancelled one's;
- with prefix caching (BlockManager(prefix_caching=True)) a sequence is admitted with its
  prompt's cached full blocks and prefilled from its first uncached token (at least its last
  prompt token is computed, so its first step samples); its full prompt blocks join the cache
  when the plan writing them is scheduled;
- a paused sequence (`pause`) is not scheduled until `resume`; with a SpillStore, when a waiting
  request does not fit, paused sequences with no plan in flight are spilled, least recently
  stepped first, while the store has room (serving/kv_spill.py: their blocks are copied to the
  workers' host memory and freed); a resumed spilled sequence is restored (fresh blocks, filled
  from the copy) before new requests are admitted, once its reservation fits again. The plan
  carries the copy operations (`StepPlan.spill_ops`);
- plans are updated in the order they were scheduled; a cancelled sequence's blocks are freed at
  once and its chunks in plans still in flight are dropped on update. Slots a cancelled chunk
  still writes are rewritten by their new owner in a later plan before they are read, provided
  every stage runs plans in dispatch order.

Cost per step: O(running sequences + the step's own tokens + their block tables), plus
O(log waiting) per admission with shortest_prompt_first; no padding.
"""

from __future__ import annotations

import heapq
from collections import deque
from dataclasses import replace
from typing import Protocol

from shardwright.serving.kv_blocks import BlockManager
from shardwright.serving.kv_spill import Spiller, SpillStore
from shardwright.serving.sampling import Decode, StopChecker, derive_seed
from shardwright.serving.sequences import FinishReason, Request, SequenceState, TokenEvent
from shardwright.serving.step_plan import SeqChunk, StepPlan


class Proposer(Protocol):
    """Speculative decoding's draft source (serving/speculative.py): up to k tokens to follow
    `tokens` (the sequence so far); [] proposes nothing."""

    def propose(self, tokens: list[int], k: int) -> list[int]: ...


class StepScheduler:
    """Continuous-batching scheduler over `blocks`; see the module docstring for guarantees.

    `decode` (ids -> text) enables text deltas and stop strings; `seed` is the base from which
    unseeded requests get their seed (`derive_seed(seed, seq_id)`; OS entropy when None).
    """

    def __init__(self, blocks: BlockManager, max_tokens_per_step: int, max_running: int,
                 eos_ids: list[int], max_model_len: int, *, decode: Decode | None = None,
                 seed: int | None = None, micro_batches: int = 1, lookahead: bool = False,
                 proposer: Proposer | None = None, spill: SpillStore | None = None,
                 max_prefill_tokens: int | None = None, shortest_prompt_first: bool = False,
                 max_wait_steps: int = 64) -> None:
        _check_limits(max_tokens_per_step, max_running, max_model_len)
        if max_prefill_tokens is not None and max_prefill_tokens < 1:
            raise ValueError(f"max_prefill_tokens={max_prefill_tokens} must be >= 1 (or None: no cap)")
        if max_wait_steps < 0:
            raise ValueError(f"max_wait_steps={max_wait_steps} must be >= 0")
        if micro_batches < 1:
            raise ValueError(f"micro_batches={micro_batches} must be >= 1 (the pipeline depth)")
        if lookahead and micro_batches != 1:
            raise ValueError("lookahead (async scheduling) needs micro_batches=1: with pipeline stages the "
                             "first stage cannot see the last stage's sampled tokens")
        if proposer is not None and lookahead:
            raise ValueError("speculative decoding needs lookahead (async scheduling) off: a verified chunk's "
                             "length is known only when its step returns")
        self.proposer = proposer
        # drafts verified (placeholders of a worker-side draft model counted as made), accepted, chunks
        self.spec_counts = {"proposed": 0, "accepted": 0, "verified_chunks": 0}
        self.micro_batches = micro_batches
        self.lookahead = lookahead
        self.blocks = blocks
        self.spiller = Spiller(blocks, spill) if spill is not None and spill.capacity_blocks else None
        self.max_tokens_per_step = max_tokens_per_step
        self.max_prefill_tokens = max_prefill_tokens
        self.shortest_prompt_first = shortest_prompt_first
        self.max_wait_steps = max_wait_steps
        self.max_running = max_running
        self.eos_ids = list(eos_ids)
        self.max_model_len = max_model_len
        self.decode = decode
        self.seed = seed
        self._waiting: dict[int, SequenceState] = {}  # arrival order
        self._shortest: list[tuple[int, int]] = []  # heap of (prompt length, seq_id); stale entries skipped
        self._running: dict[int, SequenceState] = {}  # admission order
        self._spilled: dict[int, SequenceState] = {}  # spill order
        self._by_request: dict[str, SequenceState] = {}
        self._in_flight: deque[int] = deque()  # step ids scheduled, not updated
        self._next_seq = 0
        self._next_step = 0

    # ------------------------------------------------------------------------ state
    @property
    def num_waiting(self) -> int:
        return len(self._waiting)

    @property
    def num_running(self) -> int:
        return len(self._running)

    @property
    def num_in_flight(self) -> int:
        """Plans scheduled and not yet updated."""
        return len(self._in_flight)

    @property
    def num_spilled(self) -> int:
        return len(self._spilled)

    def has_unfinished(self) -> bool:
        return bool(self._waiting or self._running or self._spilled)

    def pause(self, request_id: str) -> bool:
        """Stop scheduling a live request (its K/V may be spilled); False if it is not live."""
        seq = self._by_request.get(request_id)
        if seq is not None:
            seq.paused = True
        return seq is not None

    def resume(self, request_id: str) -> bool:
        """Schedule a paused request again (restoring its K/V first if spilled); False if not live."""
        seq = self._by_request.get(request_id)
        if seq is not None:
            seq.paused = False
        return seq is not None

    def sequence(self, request_id: str) -> SequenceState | None:
        """The live (waiting or running) sequence of `request_id`, or None."""
        return self._by_request.get(request_id)

    # ------------------------------------------------------------------ requests in
    def add(self, request: Request) -> int:
        """Queue `request`; return its seq_id. Raises ValueError (with the numbers) if it can never run."""
        self.check(request)
        p = request.params
        seq_id, self._next_seq = self._next_seq, self._next_seq + 1
        seed = p.seed if p.seed is not None else derive_seed(self.seed, seq_id)
        stop = StopChecker(p, self.eos_ids, self.decode, request.prompt_ids)
        seq = SequenceState(seq_id, request, seed, stop, list(request.prompt_ids), len(request.prompt_ids),
                            arrival_step=self._next_step)
        self._waiting[seq_id] = seq
        if self.shortest_prompt_first:
            heapq.heappush(self._shortest, (seq.num_prompt_tokens, seq_id))
        self._by_request[request.request_id] = seq
        return seq_id

    def check(self, request: Request) -> None:
        """Raise ValueError, naming the numbers and the fix, if `request` can never run here."""
        rid, n, m = request.request_id, len(request.prompt_ids), request.params.max_tokens
        if rid in self._by_request:
            raise ValueError(f"request_id={rid!r} is already queued or running; use a new id")
        if n == 0:
            raise ValueError(f"request {rid!r} has an empty prompt; give at least one token id")
        if min(request.prompt_ids) < 0:
            raise ValueError(f"request {rid!r} has negative token ids; token ids are >= 0")
        if n + m > self.max_model_len:
            raise ValueError(
                f"request {rid!r}: prompt {n} + max_tokens {m} = {n + m} exceeds max_model_len="
                f"{self.max_model_len}; lower max_tokens to <= {self.max_model_len - n}"
            )
        if not self.blocks.can_ever_fit(n + m - 1):
            cap = self.blocks.num_blocks * self.blocks.block_size
            raise ValueError(
                f"request {rid!r}: prompt {n} + max_tokens {m} needs {self.blocks.blocks_for(n + m - 1)}"
                f" KV blocks of {self.blocks.block_size} tokens but the cache has "
                f"{self.blocks.num_blocks} ({cap} slots); lower max_tokens to <= {cap - n + 1} "
                "or give the engine more KV blocks"
            )

    def cancel(self, request_id: str) -> TokenEvent | None:
        """Drop a live request and free its blocks now; its final event, or None if not live."""
        seq = self._by_request.get(request_id)
        if seq is None:
            return None
        self._finish(seq, "cancelled")
        return TokenEvent(request_id, None, "", "cancelled")

    # --------------------------------------------------------------------- schedule
    def schedule(self) -> StepPlan | None:
        """The next step's plan, or None if no sequence can run now (see module guarantees)."""
        chunks: list[SeqChunk] = []
        if self._spilled:
            self._restore_resumed()
        budget = self._schedule_running(chunks, self.max_tokens_per_step)
        self._admit(chunks, budget)
        if not chunks:
            return None
        ops = self.spiller.take_ops() if self.spiller is not None else ()
        plan = StepPlan(self._next_step, tuple(chunks), ops)
        self._in_flight.append(plan.step_id)
        self._next_step += 1
        return plan

    def _schedule_running(self, chunks: list[SeqChunk], budget: int) -> int:
        """Decode tokens, then prompt chunks, of running sequences not in flight.

        With micro_batches = P (the pipeline depth) a plan takes at most ceil(running / P)
        decode sequences, so P plans of similar size can be in flight at once.
        """
        prefilling = []
        cap = -(-len(self._running) // self.micro_batches)
        spare = budget - len(self._running)  # tokens drafts may take: every running sequence keeps one
        for seq in self._running.values():
            if seq.paused:
                continue
            if seq.in_flight:
                if self._can_look_ahead(seq) and len(chunks) < cap:
                    chunks.append(self._lookahead_chunk(seq))
                    budget -= 1
                continue  # otherwise its next token may be unknown
            if len(chunks) >= cap:
                break
            if seq.num_scheduled < seq.num_prompt_tokens:
                prefilling.append(seq)
            else:
                chunk = self._decode_chunk(seq, spare)
                chunks.append(chunk)
                budget, spare = budget - 1 - chunk.num_draft, spare - chunk.num_draft
        if self.max_prefill_tokens is not None:
            budget = min(budget, self.max_prefill_tokens)  # what prompt chunks may take from here on
        for seq in prefilling:
            if budget == 0:
                break
            n = min(budget, len(seq.tokens) - seq.num_scheduled)
            chunks.append(self._chunk(seq, n))
            budget -= n
        return budget

    def _admit(self, chunks: list[SeqChunk], budget: int) -> None:
        while budget > 0 and len(self._running) < self.max_running:
            seq = self._next_waiting()
            if seq is None:
                return
            if not self.blocks.reserve(seq.seq_id, seq.num_kv_tokens, seq.request.prompt_ids):
                if self._spill_one():
                    continue
                return  # the others wait behind this one (see the module guarantees)
            del self._waiting[seq.seq_id]
            self._running[seq.seq_id] = seq
            seq.status = "running"
            _skip_cached_prefix(seq, self.blocks)
            n = min(budget, len(seq.tokens) - seq.num_scheduled)
            chunks.append(self._chunk(seq, n))
            budget -= n

    def _restore_resumed(self) -> None:
        """Resumed spilled sequences back into the running batch, in spill order, while their
        reservations fit (spilling paused ones to make room); the first that does not fit waits,
        and so do the requests behind it (first come, first served)."""
        for seq in [s for s in self._spilled.values() if not s.paused]:
            if len(self._running) >= self.max_running:
                return
            while not self.spiller.restore(seq):
                if not self._spill_one():
                    return
            del self._spilled[seq.seq_id]
            self._running[seq.seq_id] = seq
            seq.status = "running"

    def _spill_one(self) -> bool:
        """Spill the least recently stepped paused sequence with no plan in flight, if the
        spill store has room for it; whether one was spilled."""
        if self.spiller is None:
            return False
        idle = sorted((s for s in self._running.values() if s.paused and not s.in_flight),
                      key=lambda s: s.last_step)
        for seq in idle:
            if self.spiller.spill(seq):
                del self._running[seq.seq_id]
                self._spilled[seq.seq_id] = seq
                seq.status = "spilled"
                return True
        return False

    def _next_waiting(self) -> SequenceState | None:
        """The waiting sequence admitted next, paused ones skipped (None if there is none): the
        oldest if FCFS or it has waited max_wait_steps, else the shortest prompt (ties: the oldest)."""
        oldest = next((s for s in self._waiting.values() if not s.paused), None)
        if oldest is None or not self.shortest_prompt_first \
                or self._next_step - oldest.arrival_step >= self.max_wait_steps:
            return oldest
        heap = self._shortest
        while heap[0][1] not in self._waiting:  # admitted or cancelled since it was pushed
            heapq.heappop(heap)
        top = self._waiting[heap[0][1]]
        if not top.paused:
            return top
        # a paused one stays in the heap for when it resumes; the shortest unpaused is found by a scan
        return min((s for s in self._waiting.values() if not s.paused),
                   key=lambda s: (len(s.request.prompt_ids), s.seq_id))

    def _chunk(self, seq: SequenceState, n: int) -> SeqChunk:
        start, end = seq.num_scheduled, seq.num_scheduled + n
        seq.last_step = self._next_step
        table = self.blocks.ensure(seq.seq_id, end)
        self.blocks.cache_full_blocks(seq.seq_id, end)  # this plan writes them (prefix caching)
        sample = end == len(seq.tokens)
        seq.num_scheduled, seq.in_flight, seq.last_chunk_samples = end, seq.in_flight + 1, sample
        params = seq.request.params
        return SeqChunk(
            seq.seq_id, seq.request.request_id, tuple(seq.tokens[start:end]), start, tuple(table),
            tuple(self.blocks.slots(seq.seq_id, start, end)), sample,
            params, seq.seed, len(seq.tokens) - seq.num_prompt_tokens,
            context=tuple(seq.tokens[:start]) if sample and params.penalized else (),
        )

    def _decode_chunk(self, seq: SequenceState, spare: int) -> SeqChunk:
        """The decode chunk of `seq`: its last token, then the proposer's drafts (if any), at most
        `spare` of them and never more than could be kept within max_tokens (so within its KV
        reservation: the chunk ends at position len(tokens) - 1 + k <= prompt + max_tokens - 2)."""
        p = seq.request.params
        k = min(spare, p.max_tokens - (len(seq.tokens) - seq.num_prompt_tokens) - 1)
        draft = self.proposer.propose(seq.tokens, k) if self.proposer and k > 0 and p.logprobs is None else []
        chunk = self._chunk(seq, 1)
        if not draft:
            return chunk
        end = chunk.start_pos + 1 + len(draft)
        table = self.blocks.ensure(seq.seq_id, end)
        seq.num_scheduled = end
        return replace(chunk, token_ids=chunk.token_ids + tuple(draft), block_table=tuple(table),
                       slots=tuple(self.blocks.slots(seq.seq_id, chunk.start_pos, end)), num_draft=len(draft))

    def _can_look_ahead(self, seq: SequenceState) -> bool:
        """One chunk in flight, it samples the next token, and that token will not be the last."""
        generated_after = len(seq.tokens) + 1 - seq.num_prompt_tokens
        return (self.lookahead and seq.in_flight == 1 and seq.last_chunk_samples
                and generated_after < seq.request.params.max_tokens)

    def _lookahead_chunk(self, seq: SequenceState) -> SeqChunk:
        """Decode of the token the in-flight chunk samples (its id comes from the workers)."""
        start = seq.num_scheduled  # == len(seq.tokens): the position of the pending token
        table = self.blocks.ensure(seq.seq_id, start + 1)
        seq.last_step = self._next_step
        seq.num_scheduled, seq.in_flight, seq.last_chunk_samples = start + 1, seq.in_flight + 1, True
        params = seq.request.params
        return SeqChunk(
            seq.seq_id, seq.request.request_id, (-1,), start, tuple(table),
            tuple(self.blocks.slots(seq.seq_id, start, start + 1)), True,
            params, seq.seed, len(seq.tokens) + 1 - seq.num_prompt_tokens, feedback=True,
            context=tuple(seq.tokens[:start]) if params.penalized else (),
        )

    # ----------------------------------------------------------------------- update
    def update(self, plan: StepPlan, sampled: dict[int, int]) -> list[TokenEvent]:
        """Apply the sampled tokens of `plan` (seq_id -> token id); events in chunk order.

        Tokens of sequences cancelled since the plan was scheduled are dropped. Raises
        ValueError (changing nothing) if plans arrive out of order or `sampled` does not match
        the plan's sampled chunks of live sequences.
        """
        self._check_update(plan, sampled)
        self._in_flight.popleft()
        events = []
        for c in plan.chunks:
            seq = self._running.get(c.seq_id)
            if seq is None:
                continue  # cancelled while in flight
            seq.num_computed, seq.in_flight = c.start_pos + len(c.token_ids), seq.in_flight - 1
            if c.num_draft:
                events.extend(self._append_verified(seq, c, sampled[c.seq_id]))
            elif c.sample:
                events.append(self._append(seq, int(sampled[c.seq_id])))
        return events

    def _check_update(self, plan: StepPlan, sampled: dict[int, int]) -> None:
        if not self._in_flight or self._in_flight[0] != plan.step_id:
            oldest = self._in_flight[0] if self._in_flight else None
            raise ValueError(f"update for step {plan.step_id} but the oldest plan in flight is "
                             f"{oldest}; update plans in the order schedule() returned them")
        wanted = set(plan.sampled_seq_ids())
        extra = sorted(set(sampled) - wanted)
        missing = sorted(s for s in wanted - set(sampled) if s in self._running)
        if extra or missing:
            raise ValueError(f"step {plan.step_id}: sampled tokens for seq_ids {extra} not sampled "
                             f"in the plan, none for {missing}; pass one token per sampled chunk")

    def _append_verified(self, seq: SequenceState, c: SeqChunk, tokens) -> list[TokenEvent]:
        """A verified chunk's accepted drafts and next token, appended one by one up to the first
        stop; the sequence's length rolls back to them (K/V of rejected drafts get overwritten)."""
        tokens = [int(t) for t in (tokens if isinstance(tokens, (list, tuple)) else [tokens])]
        accepted = len(tokens) - 1
        placeholders = c.token_ids[1] < 0  # drafts made on the workers (draft model): not known here
        if not 0 <= accepted <= c.num_draft or (
                not placeholders and tokens[:accepted] != list(c.token_ids[1:1 + accepted])):
            raise ValueError(f"step: seq {c.seq_id} got tokens {tokens} for drafts {list(c.token_ids[1:])}; "
                             "a verified chunk returns its accepted drafts (a prefix) and one more token")
        seq.num_computed = seq.num_scheduled = c.start_pos + 1 + accepted
        counts = self.spec_counts
        counts["proposed"] += c.num_draft
        counts["accepted"] += accepted
        counts["verified_chunks"] += 1
        events = []
        for t in tokens:
            events.append(self._append(seq, t))
            if seq.status == "finished":
                break
        return events

    def _append(self, seq: SequenceState, token: int) -> TokenEvent:
        seq.tokens.append(token)
        decision = seq.stop.push(token)
        if decision.finished:
            self._finish(seq, decision.reason)
        return TokenEvent(seq.request.request_id, token, decision.text, decision.reason)

    def _finish(self, seq: SequenceState, reason: FinishReason) -> None:
        seq.status, seq.finish_reason = "finished", reason
        self._waiting.pop(seq.seq_id, None)
        self._running.pop(seq.seq_id, None)
        if self._spilled.pop(seq.seq_id, None) is not None:
            self.spiller.drop(seq.seq_id)
        del self._by_request[seq.request.request_id]
        self.blocks.free(seq.seq_id)


def _skip_cached_prefix(seq: SequenceState, blocks: BlockManager) -> None:
    """A just-admitted sequence starts at its first uncached prompt token: its reservation put
    the prefix-cache hits (always fewer than its prompt's tokens) at the head of its table."""
    seq.num_scheduled = seq.num_computed = len(blocks.block_table(seq.seq_id)) * blocks.block_size


def _check_limits(max_tokens_per_step: int, max_running: int, max_model_len: int) -> None:
    if max_running < 1:
        raise ValueError(f"max_running={max_running} must be >= 1")
    if max_tokens_per_step < max_running:
        raise ValueError(
            f"max_tokens_per_step={max_tokens_per_step} must be >= max_running={max_running} "
            "so that every running sequence decodes each step"
        )
    if max_model_len < 2:
        raise ValueError(f"max_model_len={max_model_len} must be >= 2 (a prompt token and a new one)")
