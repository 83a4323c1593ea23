"""InferenceEngine: the single controller of one deployment (EnergonAI style).

Guarantees:
- The engine owns the batch, the KV block tables and the sampling parameters; each step is one
  message to every worker of the gang; activations and collectives go worker to worker.
- Continuous batching: requests join the running batch between steps; prefill chunks and decode
  tokens share a step; batches are packed without padding tokens.
- With pp = P, up to P plans are in flight (the scheduler never puts a sequence in two plans).
- A worker failure fails the requests it affected with an error naming rank and node, marks the
  engine unhealthy, and the engine rebuilds the gang (reloading shards) without a restart, trying
  up to `rebuild_attempts` times with backoff; meanwhile requests are refused naming the cause.
  When every attempt fails the engine is `failed` (health says why), its loop ends and every
  request is refused with the cause: no request is accepted that can never finish.
- Admission refuses what can never fit (clear error) and queues what does not fit yet.
- Prefix caching (`prefix_caching`, on by default): requests whose prompts start with the same
  full KV blocks share them and prefill from their first uncached token; outputs are those of
  prefix caching off (serving.kv_blocks states the rules; tests/engine/test_engine_prefix.py).
- Speculative decoding (`speculative`, off by default; serving/speculative.py, draft_model.py):
  drafts are verified in the same one message per step; greedy output is plain decoding's, and
  sampled output keeps the target's distribution (n-gram drafts: the very same tokens).
- KV spilling (`kv_spill_blocks`, off by default; serving/kv_spill.py, pool/kv_host.py): a request
  whose caller leaves `max_unread_tokens` tokens unread is paused; when a waiting request does not
  fit, paused requests' KV blocks move to the workers' host memory (within its budget; when it is
  full the waiting request waits, as without spilling) and come back exactly when they resume.
  `health()["kv_spill"]` counts the blocks and bytes spilled and restored.
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import replace
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, model_validator

from shardwright.serving.batching import Request, StepScheduler
from shardwright.actors.gang import GangConfig, GangError, ServingGang
from shardwright.serving.kv_blocks import BlockManager
from shardwright.serving.kv_spill import SpillStore
from shardwright.serving.requests import RequestOutput, RequestStream
from shardwright.serving.sampling import SamplingParams
from shardwright.actors.shard_runner import StepMessage
from shardwright.config import DType, EngineOptions, ModelSpec, ParallelLayout
from shardwright.serving.draft_model import DraftPlaceholders, DraftTracker
from shardwright.serving.speculative import NgramProposer
from shardwright.models.checkpoint import CheckpointReader
from shardwright.models.quant import check_group_layout
from shardwright.models.tokenizer import load_tokenizer
from shardwright.pool.planner import HOST, Holder, RankNeed, plan_pool
from shardwright.pool.sizing import shard_sizes

log = logging.getLogger(__name__)
LIVENESS_INTERVAL_S = 2.0  # how often an idle engine checks that its workers live


class EngineConfig(EngineOptions):
    """One inference deployment as its controller runs it: a deployment's serving options
    (`config.EngineOptions`: KV cache, batching, prefix caching, pooling, quantization, speculative
    decoding, defined there once) plus the model, its layout and the runtime's own settings."""

    model_dir: Path = Field(description="Hugging Face directory (config.json + safetensors).")
    layout: ParallelLayout = Field(default_factory=ParallelLayout, description="tp and pp of the gang.")
    dtype: DType | None = Field(None, description="Override the checkpoint's dtype.")
    collective_timeout_s: float = Field(30.0, gt=0, description="Worker collective/step timeout.")
    threads_per_worker: int | None = Field(None, ge=1, description="CPU threads per worker (CPU only).")
    pack_weights: bool = Field(
        True, description="On CPU, pre-pack the linear weights into oneDNN's blocked layout once at load "
                          "(shardwright.models.packed), so no GEMM re-packs them per call: bf16 always, fp32 "
                          "where torch runs at AVX-512 (measured faster there, slower elsewhere). Off: plain "
                          "tensors (the reference).")
    async_scheduling: bool | None = Field(
        None, description="With one pipeline stage, dispatch step k+1 before step k returns (the workers "
                          "feed their own sampled tokens back), hiding the controller's per-step work. "
                          "None (auto): on when this process sees CUDA; off on CPU-only machines, where "
                          "the workers' threads take every core and the overlapped controller work "
                          "slows them down instead (measured here: 2 cores).")
    dispatch: Literal["channel", "actor-calls"] = Field(
        "channel", description="How each step reaches the workers. 'channel' (default): one TCP "
                               "connection from each worker to the controller, read by the worker's "
                               "compute thread, one pickled message per step (shardwright.actors.step_channel). "
                               "'actor-calls': one Ray actor call per worker. Falls back to actor calls, "
                               "with a warning, where the channel cannot be set up. (A Ray compiled graph "
                               "was tried and removed: its channel threads busy-wait beside the workers, "
                               "1.26-2.0x slower decode at batch 8-32 on 2 cores, and a killed worker "
                               "sometimes left the step blocked past 30 s.)")
    bundle_nodes: tuple[str, ...] | None = Field(
        None, description="Ray node id per rank from the scheduler's placement; None lets Ray pack the gang.")
    rebuild_attempts: int = Field(4, ge=1, description="Gang rebuilds tried after a worker dies before the "
                                                       "deployment is failed (backoff 1, 2, 4, ... s between).")

    @model_validator(mode="after")
    def _speculative_needs_sync_steps(self) -> EngineConfig:
        if self.speculative.method != "none" and self.async_scheduling:
            raise ValueError(f"speculative.method={self.speculative.method} needs async_scheduling off "
                             "(a verified chunk's length is known only when its step returns); "
                             "set async_scheduling: null or false")
        return self


def resident_need(spec: ModelSpec, config: EngineConfig, rank: int) -> tuple[int, tuple[int, ...]]:
    """Bytes rank `rank` must keep resident besides its layers (non-layer weights, the KV cache,
    the activations of the largest step the limits allow), and the bytes of each of its layers."""
    sizes = shard_sizes(spec, config.layout, rank)
    cache_tokens = len(range(sizes.cp_rank, config.num_blocks, config.layout.cp)) * config.block_size
    context = min(spec.max_position_embeddings, config.num_blocks * config.block_size)
    fixed = (sizes.other_weight_bytes + cache_tokens * sizes.kv_bytes_per_token
             + sizes.activation_bytes(config.max_tokens_per_step, config.max_running, context, context))
    return fixed, sizes.layer_bytes


def _split_reply(reply) -> tuple[list, list | None, list[int] | None]:
    """A worker's step reply: tokens, (tokens, logprobs) when a request asked for them, or with
    a draft model (tokens, logprobs or None, drafts made per drafted chunk)."""
    if not isinstance(reply, tuple):
        return reply, None, None
    return reply if len(reply) == 3 else (*reply, None)


class InferenceEngine:
    """Serves one model on a gang of ShardWorkers; thread-safe public methods."""

    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        self.spec = ModelSpec.from_hf_dir(config.model_dir, dtype=config.dtype)
        config.layout.validate_for(self.spec)
        if config.quant == "rtn4":
            check_group_layout(self.spec, config.layout, config.group_size)
        if config.quant != "none" and config.pool.budget_bytes is not None:
            raise ValueError(f"quant={config.quant} with a memory budget (peer pooling) is not supported; "
                             "drop pool.budget_bytes or quant")
        if config.layout.dp != 1:
            raise ValueError(f"layout: the inference engine runs tp, pp and cp; dp={config.layout.dp} must be 1 "
                             "(deploy several copies for replicas)")
        if config.speculative.method == "draft" and (config.layout.pp, config.layout.cp, config.layout.ep) != (1, 1, 1):
            raise ValueError(f"speculative.method=draft runs the draft model in the sampler worker and needs pp=1, "
                             f"cp=1 and ep=1 (got pp={config.layout.pp}, cp={config.layout.cp}, ep={config.layout.ep}); "
                             "use method=ngram there")
        if config.speculative.method == "draft" and config.pool.budget_bytes is not None:
            raise ValueError("speculative.method=draft with a memory budget (peer pooling) is not supported; "
                             "drop pool.budget_bytes or use method=ngram")
        if config.kv_spill_blocks and (config.layout.cp != 1 or config.speculative.method == "draft"):
            raise ValueError(f"kv_spill_blocks={config.kv_spill_blocks} needs cp=1 (a restored block may live on "
                             f"another CP rank; got cp={config.layout.cp}) and no draft model (its own cache "
                             "does not spill); set kv_spill_blocks: 0")
        if config.num_blocks < config.layout.cp:
            raise ValueError(f"num_blocks={config.num_blocks}: the KV cache is sharded over cp={config.layout.cp} "
                             "ranks, so it needs at least cp blocks")
        self.tokenizer = load_tokenizer(config.model_dir)
        self._lock = threading.Condition()
        self._streams: dict[str, RequestStream] = {}
        self._incoming: deque[Request] = deque()
        self._cancelled: deque[str] = deque()
        self._read: deque[str] = deque()  # requests whose callers took events (back-pressure)
        self._stalled = False  # the last schedule() made no plan: wait for news before trying again
        self._calls: deque[tuple[Callable, Future]] = deque()  # gang calls run between steps
        self._ids = itertools.count()
        self._stop = False
        self._healthy = False
        self._last_error: str | None = None
        self.failed: str | None = None  # why the engine gave up (every rebuild failed)
        self._gang: ServingGang | None = None
        self.pool_plan = None
        self._scheduler: StepScheduler | None = None
        self._drafts: DraftTracker | None = None  # method=draft: what the draft model has cached
        self._thread: threading.Thread | None = None
        self.steps = 0
        # (completion time, tokens sampled, decode-only step) of recent steps, for benchmarks.
        self.step_log: deque[tuple[float, int, bool]] = deque(maxlen=100_000)

    # ---- lifecycle -------------------------------------------------------------------------
    def start(self) -> InferenceEngine:
        """Build the gang (place, join groups, load shards, allocate cache) and start serving.

        Idempotent: a started engine is returned as it is.
        """
        if self._thread is not None:
            return self
        self._build()
        self._thread = threading.Thread(target=self._loop, name="shardwright-engine", daemon=True)
        self._thread.start()
        return self

    def _build(self) -> None:
        c = self.config
        CheckpointReader(c.model_dir).close()  # a checkpoint gone fails here, before any worker starts
        gang = ServingGang(GangConfig(layout=c.layout, collective_timeout_s=c.collective_timeout_s,
                                     threads_per_worker=c.threads_per_worker, bundle_nodes=c.bundle_nodes,
                                     peers=c.pool.peers),
                          runner_kwargs={"memory_budget_bytes": c.pool.budget_bytes, "pack_weights": c.pack_weights},
                          peer_kwargs={"memory_budget_bytes": c.pool.peer_budget_bytes or c.pool.budget_bytes})
        try:
            gang.start()
            pooled = self._place_pooled_layers(gang)
            quant = None if c.quant == "none" else (c.quant, c.group_size)
            gang.load_shards(str(c.model_dir), c.dtype, pooled, c.pool.prefetch_depth, quant)
            if c.speculative.method == "draft":
                gang.load_draft(str(c.speculative.draft_model), c.dtype)
            gang.unlink_peers()  # every owner has mapped its segments: drop their names
            gang.allocate_cache(c.num_blocks, c.block_size, c.kv_spill_blocks)
            try:
                if c.dispatch == "channel":
                    gang.open_channel(c.collective_timeout_s + 30)
            except Exception as err:  # still correct with actor calls, only slower
                log.warning("%s dispatch unavailable, using actor calls: %s", c.dispatch, err)
        except Exception:
            gang.kill()
            raise
        self._gang = gang
        self._scheduler = StepScheduler(
            BlockManager(c.num_blocks, c.block_size, prefix_caching=c.prefix_caching),
            max_tokens_per_step=c.max_tokens_per_step,
            max_running=c.max_running, eos_ids=self.spec.eos_token_id,
            max_model_len=self.spec.max_position_embeddings, decode=self.tokenizer.decode,
            micro_batches=c.layout.pp, lookahead=self._lookahead, proposer=self._proposer(),
            spill=SpillStore(c.kv_spill_blocks, self._kv_bytes_per_block(gang)),
            max_prefill_tokens=c.max_prefill_tokens_per_step, shortest_prompt_first=c.shortest_prompt_first,
            max_wait_steps=c.max_wait_steps)
        self._drafts = (DraftTracker(c.block_size, c.speculative.fallback_threshold)
                        if c.speculative.method == "draft" else None)
        self._healthy, self._last_error = True, None

    def _kv_bytes_per_block(self, gang: ServingGang) -> int:
        """K/V bytes of one block over every compute rank (each holds its layers' and heads' share)."""
        return sum(shard_sizes(self.spec, self.config.layout, r).kv_bytes_per_token
                   for r in gang.compute_ranks) * self.config.block_size

    def _place_pooled_layers(self, gang: ServingGang) -> dict[int, dict]:
        """Plan which layers each rank keeps resident (refusing what cannot fit), load the
        pooled ones on the peers; returns, per rank, where each pooled layer lives."""
        c, pool = self.config, self.config.pool
        self.pool_plan = None
        if pool.budget_bytes is None:
            return {}
        # Each worker resolved its budget ('device-free' is the GPU's free memory when it started).
        memory = gang.memory()
        budgets = [m["budget_bytes"] for m in memory]
        needs = []
        for rank in gang.compute_ranks:
            fixed, layers = resident_need(self.spec, c, rank)
            needs.append(RankNeed(rank, gang.nodes[rank]["node_id"], budgets[rank], fixed, layers,
                                  binds_in_place=memory[rank]["device_type"] == "cpu"))
        holders = [Holder(i, gang.nodes[r]["node_id"], budgets[r]) for i, r in enumerate(gang.peer_ranks)]
        plan = plan_pool(needs, holders, host_bytes=pool.host_bytes, prefetch_depth=pool.prefetch_depth,
                         force_fraction=pool.pooled_fraction)
        self.pool_plan = plan
        for line in plan.describe():
            log.info("memory pool plan: %s", line)
        pooled: dict[int, dict] = {r: {} for r in gang.compute_ranks}
        for i, peer_rank in enumerate(gang.peer_ranks):
            items = plan.held_by(i)
            if not items:
                continue
            handles = gang.load_on_peer(peer_rank, str(c.model_dir), c.dtype, items)
            same_node = gang.nodes[peer_rank]["node_id"]
            for (rank, layer), handle in handles.items():
                where = dict(handle, peer=gang.workers[peer_rank])
                if gang.nodes[rank]["node_id"] != same_node:
                    where["path"] = None  # another node: fetch through the peer actor
                pooled[rank][layer] = where
        for rank in gang.compute_ranks:
            for layer, where in plan.pooled(rank).items():
                if where == HOST:
                    pooled[rank][layer] = {"host": True}
        return pooled

    def memory(self) -> dict:
        """Each worker's ledger (budget, resident bytes by kind, high-water mark) and the pool plan."""
        gang = self._gang
        if gang is None:
            return {}
        snaps = gang.memory(timeout_s=30)
        return {"workers": {gang.describe(r): s for r, s in zip(gang.all_ranks, snaps)},
                "plan": self.pool_plan.to_dict() if self.pool_plan else None,
                "plan_lines": self.pool_plan.describe() if self.pool_plan else []}

    def shutdown(self) -> None:
        with self._lock:
            self._stop = True
            self._lock.notify_all()
        if self._thread is not None:
            self._thread.join(timeout=60)
        if self._gang is not None:
            self._gang.kill()
        self._fail_all("the engine shut down")

    def __enter__(self) -> InferenceEngine:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.shutdown()

    # ---- requests --------------------------------------------------------------------------
    def submit(self, prompt: str | list[int], params: SamplingParams | None = None) -> RequestStream:
        """Queue one request; its tokens arrive on the returned stream as they are produced."""
        params = params or SamplingParams()
        ids = self.prompt_ids(prompt)
        request_id = f"req-{next(self._ids)}"
        request = Request(request_id=request_id, prompt_ids=ids, params=params)
        stream = RequestStream(request_id, ids, self.tokenizer.decode)
        if self.config.max_unread_tokens is not None:
            stream.watch_reads(self._on_read)
        with self._lock:
            if self._stop:
                raise RuntimeError("the engine is shut down")
            if self.failed is not None:
                raise RuntimeError(f"the deployment failed: {self.failed}")
            if not self._healthy and self._thread is not None:
                raise RuntimeError(f"the deployment is rebuilding its gang after: {self._last_error}; retry shortly")
            self._scheduler.check(request)  # raises ValueError for what can never run
            self._streams[request_id] = stream
            self._incoming.append(request)
            self._lock.notify_all()
        return stream

    def prompt_ids(self, prompt: str | list[int]) -> list[int]:
        """Token ids of `prompt` (text is tokenised); raises ValueError for ids outside the vocab."""
        ids = self.tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)
        bad = [i for i in ids if not 0 <= i < self.spec.vocab_size]
        if bad:
            raise ValueError(f"prompt ids {bad[:5]} are outside the vocabulary [0, {self.spec.vocab_size})")
        if not ids:
            raise ValueError("the prompt is empty: give at least one token")
        return ids

    def generate(self, prompts: list[str] | list[list[int]], params: SamplingParams | None = None,
                 timeout_s: float | None = None) -> list[RequestOutput]:
        """Run every prompt (batched continuously) and return their outputs in order."""
        streams = [self.submit(p, params) for p in prompts]
        return [s.result(timeout_s) for s in streams]

    def _on_read(self, request_id: str) -> None:
        with self._lock:
            self._read.append(request_id)
            self._stalled = False
            self._lock.notify_all()

    def cancel(self, request_id: str) -> None:
        """Stop a request; its KV blocks are freed before the next step."""
        with self._lock:
            self._cancelled.append(request_id)
            self._lock.notify_all()

    def prompt_logits(self, prompt: str | list[int], timeout_s: float = 120.0):
        """Full-vocabulary logits [tokens, vocab] (float32, CPU) of one prompt, no KV cache.

        Runs on the gang between serving steps, so it never interleaves with a step's collectives.
        """
        token_ids = self.prompt_ids(prompt)
        return self._between_steps(lambda gang, timeout_s: gang.prompt_logits(token_ids, timeout_s), timeout_s)

    def _between_steps(self, call: Callable[[ServingGang, float], Any], timeout_s: float):
        """Run `call(gang, timeout_s)` on the engine's thread while no step is in flight."""
        if self._thread is None:
            raise RuntimeError("the engine is not started; call start() first")
        future: Future = Future()
        with self._lock:
            self._calls.append((call, future))
            self._lock.notify_all()
        return future.result(timeout=timeout_s)

    # ---- health ----------------------------------------------------------------------------
    def health(self, probe: bool = True) -> dict:
        """Engine state; with probe=True, a real all-reduce through the gang. `prefix_cache` holds
        the prefix cache's counters (BlockManager.prefix_stats: cached blocks, hits, prefill
        tokens saved, evictions) since the gang was last built."""
        status = {"healthy": self._healthy, "last_error": self._last_error, "failed": self.failed,
                  "steps": self.steps,
                  "layout": self.config.layout.model_dump(),
                  "dispatch": self._gang.dispatch_mode if self._gang is not None else None}
        if probe and self._healthy and self._gang is not None:
            try:
                self._probe()
            except Exception as err:
                status.update(healthy=False, last_error=f"{type(err).__name__}: {err}")
        if self._scheduler is not None:
            status["blocks_in_use"] = self._scheduler.blocks.num_used
            status["blocks_total"] = self._scheduler.blocks.num_blocks
            status["running"], status["waiting"] = self._scheduler.num_running, self._scheduler.num_waiting
            status["prefix_cache"] = self._scheduler.blocks.prefix_stats()
            spiller = self._scheduler.spiller
            status["kv_spill"] = dict(spiller.store.stats(), spilled_requests=self._scheduler.num_spilled) \
                if spiller is not None else None
        if self._gang is not None:
            status["workers"] = [self._gang.describe(r) for r in range(len(self._gang.nodes))]
        if self.pool_plan is not None:
            status["memory_pool"] = self.pool_plan.describe()
        return status

    def _probe(self) -> None:
        """The gang's all-reduce ping, run between serving steps once the loop runs (a probe
        from this thread would issue collectives beside a step's, on the same groups)."""
        if self._thread is None:
            self._gang.ping()
            return
        self._between_steps(lambda gang, timeout_s: gang.ping(timeout_s), self.config.collective_timeout_s + 30)

    @property
    def blocks_in_use(self) -> int:
        return self._scheduler.blocks.num_used if self._scheduler else 0

    # ---- the control loop ------------------------------------------------------------------
    def _loop(self) -> None:
        inflight: deque = deque()
        checked_at = time.monotonic()
        while True:
            idle_check = False
            with self._lock:
                while not self._stop and not inflight and not self._has_work():
                    if time.monotonic() - checked_at >= LIVENESS_INTERVAL_S:
                        idle_check = True
                        break
                    self._lock.wait(timeout=1.0)
                if self._stop:
                    return
                self._drain_inbox()
            try:
                if idle_check:  # an idle gang is checked too: a dead worker is found without a request
                    checked_at = time.monotonic()
                    self._gang.check_alive()
                    continue
                if self._calls and not inflight:
                    self._run_calls()
                if not self._calls:
                    self._fill_pipeline(inflight)
                if inflight:
                    self._finish_oldest(inflight)
            except GangError as err:
                self._on_gang_failure(err, inflight)
                if self.failed is not None:
                    return

    def _has_work(self) -> bool:
        return bool(self._incoming or self._cancelled or self._calls or self._read
                    or (self._scheduler.has_unfinished() and not self._stalled))

    def _run_calls(self) -> None:
        """Run queued gang calls (the pipeline is empty), each answering its future."""
        while self._calls:
            with self._lock:
                call, future = self._calls.popleft()
            try:
                future.set_result(call(self._gang, self.config.collective_timeout_s + 30))
            except Exception as err:
                future.set_exception(err)
                if isinstance(err, GangError):
                    raise

    def _drain_inbox(self) -> None:
        if self._incoming or self._cancelled or self._read:
            self._stalled = False
        limit = self.config.max_unread_tokens
        while self._read:
            rid = self._read.popleft()
            stream = self._streams.get(rid)
            if stream is not None and stream.unread < limit:
                self._scheduler.resume(rid)
        while self._cancelled:
            rid = self._cancelled.popleft()
            self._scheduler.cancel(rid)
            stream = self._streams.pop(rid, None)
            if stream is not None:
                stream.finish("cancelled")
        while self._incoming:
            self._scheduler.add(self._incoming.popleft())

    def _proposer(self):
        spec = self.config.speculative
        if spec.method == "ngram":
            return NgramProposer(spec.num_draft_tokens, spec.ngram_max, spec.ngram_min)
        if spec.method == "draft":
            return DraftPlaceholders(spec.num_draft_tokens)
        return None

    def speculative_counts(self) -> dict:
        """Draft tokens proposed and accepted, and chunks verified, since the gang was (re)built;
        with a draft model `proposed` counts the drafts it made (fallback stops some early)."""
        if self._scheduler is None:
            return {}
        counts = dict(self._scheduler.spec_counts)
        if self._drafts is not None:
            counts["proposed"] = self._drafts.num_drafted
        return counts

    @property
    def _lookahead(self) -> bool:
        if self.config.speculative.method != "none":
            return False
        wanted = self.config.async_scheduling
        if wanted is None:
            import torch

            wanted = torch.cuda.is_available()
        return wanted and self.config.layout.pp == 1

    def _fill_pipeline(self, inflight: deque) -> None:
        depth = 2 if self._lookahead else self.config.layout.pp
        while len(inflight) < depth:
            plan = self._scheduler.schedule()
            if plan is None:
                self._stalled = not inflight  # only paused requests left, or none fits: wait for news
                return
            msg = self._message(plan)
            refs = self._gang.dispatch(msg)
            inflight.append((plan, refs, msg.draft))

    def _finish_oldest(self, inflight: deque) -> None:
        plan, refs, draft = inflight.popleft()
        results = self._gang.step_results(refs, timeout_s=self.config.collective_timeout_s + 30)
        tokens, logprobs, drafted = _split_reply(results[self._gang.sampler_rank()])
        sampled = dict(zip(plan.sampled_seq_ids(), tokens))
        by_request = {} if logprobs is None else {
            c.request_id: lp for c, lp in zip(plan.sampled_chunks(), logprobs) if lp is not None}
        self.steps += 1
        self.step_log.append((time.perf_counter(), sum(len(t) if isinstance(t, list) else 1 for t in tokens),
                              all(len(c.token_ids) == 1 + c.num_draft for c in plan.chunks)))
        events = self._scheduler.update(plan, sampled)
        if draft is not None:
            self._drafts.update(plan, draft, drafted, sampled, lambda rid: self._scheduler.sequence(rid) is not None)
        for event in events:
            stream = self._streams.get(event.request_id)
            if stream is None:
                continue
            if event.token_id is not None and event.request_id in by_request:
                event = replace(event, logprob=by_request[event.request_id])
            stream.push(event)
            if event.finish_reason is not None:
                self._streams.pop(event.request_id, None)
            elif self.config.max_unread_tokens is not None and stream.unread >= self.config.max_unread_tokens:
                self._scheduler.pause(event.request_id)  # its caller stopped reading: hold it

    def _message(self, plan) -> StepMessage:
        draft = self._drafts.plan(plan, lambda rid: self._scheduler.sequence(rid).tokens) if self._drafts else None
        return StepMessage.from_plan(plan, lookahead=self._lookahead,
                                     rollback_threshold=self.config.speculative.rollback_threshold, draft=draft)

    def _on_gang_failure(self, err: GangError, inflight: deque) -> None:
        log.error("gang failure: %s", err)
        self._healthy, self._last_error = False, str(err)
        inflight.clear()
        self._fail_all(f"request failed: {err}")
        if self._gang is not None:
            self._gang.kill()
        attempts = self.config.rebuild_attempts
        for attempt in range(attempts):
            try:
                self._build()
                log.info("engine rebuilt after: %s", err)
                return
            except Exception as rebuild_err:  # stays unhealthy; requests are refused with the reason
                self._last_error = f"{err}; rebuild {attempt + 1}/{attempts} failed: {rebuild_err}"
                log.error("rebuild %d/%d failed: %s", attempt + 1, attempts, rebuild_err)
            with self._lock:  # back off, unless shut down meanwhile
                if attempt + 1 < attempts and self._lock.wait_for(lambda: self._stop, timeout=min(2.0 ** attempt, 8.0)):
                    return
        self.failed = self._last_error
        self._fail_all(f"the deployment failed: {self.failed}")

    def _fail_all(self, message: str) -> None:
        with self._lock:
            streams, self._streams = self._streams, {}
            self._incoming.clear()
            calls, self._calls = self._calls, deque()
        for _, _, future in calls:
            future.set_exception(RuntimeError(message))
        for stream in streams.values():
            stream.fail(message)
