"""InferenceEngine: the single controller of one deployment (EnergonAI style).

Guarantees:
- The engine owns the batch, the KV block tables and the sampling parameters; each step is one
  message to every worker of the gang; activations and collectives go worker to worker.
- Continuous batching: requests join the running batch between steps; prefill chunks and decode
  tokens share a step; batches are packed without padding tokens.
- With pp = P, up to P plans are in flight (the scheduler never puts a sequence in two plans).
- A worker failure fails the requests it affected with an error naming rank and node, marks the
  engine unhealthy, and the engine rebuilds the gang (reloading shards) without a restart.
- Admission refuses what can never fit (clear error) and queues what does not fit yet.
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from collections import deque
from pathlib import Path

from pydantic import Field

from shardwright.actors.batching import Request, StepScheduler
from shardwright.actors.gang import GangConfig, GangError, WorkerGang
from shardwright.actors.kv_blocks import BlockManager
from shardwright.actors.requests import RequestOutput, RequestStream
from shardwright.actors.sampling import SamplingParams
from shardwright.actors.shard_runner import StepMessage
from shardwright.config import DType, ModelSpec, ParallelLayout, StrictModel
from shardwright.models.tokenizer import load_tokenizer

log = logging.getLogger(__name__)


class EngineConfig(StrictModel):
    """One inference deployment: the model, its layout and the serving limits."""

    model_dir: Path = Field(description="Hugging Face directory (config.json + safetensors).")
    layout: ParallelLayout = Field(default_factory=ParallelLayout, description="tp and pp of the gang.")
    dtype: DType | None = Field(None, description="Override the checkpoint's dtype.")
    block_size: int = Field(16, ge=1, description="Tokens per KV-cache block.")
    num_blocks: int = Field(1024, ge=1, description="KV-cache blocks per worker.")
    max_tokens_per_step: int = Field(512, ge=1, description="Token budget of one step.")
    max_running: int = Field(64, ge=1, description="Most sequences in the running batch.")
    collective_timeout_s: float = Field(30.0, gt=0, description="Worker collective/step timeout.")
    threads_per_worker: int | None = Field(None, ge=1, description="CPU threads per worker (CPU only).")
    bundle_nodes: tuple[str, ...] | None = Field(
        None, description="Ray node id per rank from the scheduler's placement; None lets Ray pack the gang.")


class InferenceEngine:
    """Serves one model on a gang of ShardWorkers; thread-safe public methods."""

    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        self.spec = ModelSpec.from_hf_dir(config.model_dir, dtype=config.dtype)
        config.layout.validate_for(self.spec)
        if config.layout.cp != 1 or config.layout.dp != 1:
            raise ValueError("the inference engine runs tp and pp; cp and dp must be 1 for now")
        self.tokenizer = load_tokenizer(config.model_dir)
        self._lock = threading.Condition()
        self._streams: dict[str, RequestStream] = {}
        self._incoming: deque[Request] = deque()
        self._cancelled: deque[str] = deque()
        self._ids = itertools.count()
        self._stop = False
        self._healthy = False
        self._last_error: str | None = None
        self._gang: WorkerGang | None = None
        self._scheduler: StepScheduler | None = None
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
        gang = WorkerGang(GangConfig(layout=c.layout, collective_timeout_s=c.collective_timeout_s,
                                     threads_per_worker=c.threads_per_worker, bundle_nodes=c.bundle_nodes))
        phases = [("load", (str(c.model_dir), c.dtype)), ("allocate_cache", (c.num_blocks, c.block_size))]
        try:
            gang.start(phases)
        except Exception:
            gang.kill()
            raise
        self._gang = gang
        self._scheduler = StepScheduler(
            BlockManager(c.num_blocks, c.block_size), max_tokens_per_step=c.max_tokens_per_step,
            max_running=c.max_running, eos_ids=self.spec.eos_token_id,
            max_model_len=self.spec.max_position_embeddings, decode=self.tokenizer.decode,
            micro_batches=c.layout.pp)
        self._healthy, self._last_error = True, None

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
        with self._lock:
            if self._stop:
                raise RuntimeError("the engine is shut down")
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

    def cancel(self, request_id: str) -> None:
        """Stop a request; its KV blocks are freed before the next step."""
        with self._lock:
            self._cancelled.append(request_id)
            self._lock.notify_all()

    # ---- health ----------------------------------------------------------------------------
    def health(self, probe: bool = True) -> dict:
        """Engine state; with probe=True, a real all-reduce through the gang."""
        status = {"healthy": self._healthy, "last_error": self._last_error, "steps": self.steps,
                  "layout": self.config.layout.model_dump()}
        if probe and self._healthy and self._gang is not None:
            try:
                self._gang.ping()
            except GangError as err:
                status.update(healthy=False, last_error=str(err))
        if self._scheduler is not None:
            status["blocks_in_use"] = self._scheduler.blocks.num_used
        if self._gang is not None:
            status["workers"] = [self._gang.describe(r) for r in range(len(self._gang.nodes))]
        return status

    @property
    def blocks_in_use(self) -> int:
        return self._scheduler.blocks.num_used if self._scheduler else 0

    # ---- the control loop ------------------------------------------------------------------
    def _loop(self) -> None:
        inflight: deque = deque()
        while True:
            with self._lock:
                while not self._stop and not inflight and not self._has_work():
                    self._lock.wait(timeout=1.0)
                if self._stop:
                    return
                self._drain_inbox()
            try:
                self._fill_pipeline(inflight)
                if inflight:
                    self._finish_oldest(inflight)
            except GangError as err:
                self._on_gang_failure(err, inflight)

    def _has_work(self) -> bool:
        return bool(self._incoming or self._cancelled or self._scheduler.has_unfinished())

    def _drain_inbox(self) -> None:
        while self._cancelled:
            rid = self._cancelled.popleft()
            self._scheduler.cancel(rid)
            stream = self._streams.pop(rid, None)
            if stream is not None:
                stream.finish("cancelled")
        while self._incoming:
            self._scheduler.add(self._incoming.popleft())

    def _fill_pipeline(self, inflight: deque) -> None:
        while len(inflight) < self.config.layout.pp:
            plan = self._scheduler.schedule()
            if plan is None:
                return
            refs = self._gang.dispatch(self._message(plan))
            inflight.append((plan, refs))

    def _finish_oldest(self, inflight: deque) -> None:
        plan, refs = inflight.popleft()
        results = self._gang.get(refs, list(range(len(refs))), timeout_s=self.config.collective_timeout_s + 30)
        tokens = results[self._gang.sampler_rank()]
        sampled = dict(zip(plan.sampled_seq_ids(), tokens))
        self.steps += 1
        self.step_log.append((time.perf_counter(), len(tokens), all(n == 1 for n in plan.query_lens)))
        for event in self._scheduler.update(plan, sampled):
            stream = self._streams.get(event.request_id)
            if stream is None:
                continue
            stream.push(event)
            if event.finish_reason is not None:
                self._streams.pop(event.request_id, None)

    def _message(self, plan) -> StepMessage:
        sampled = plan.sampled_chunks()
        return StepMessage(
            token_ids=plan.token_ids(), positions=plan.positions(), slot_mapping=plan.slot_mapping(),
            query_lens=plan.query_lens, block_tables=[c.block_table for c in plan.chunks],
            sample_index=plan.sample_indices(), sampling=[c.params for c in sampled],
            seeds=[c.seed for c in sampled], steps=[c.step for c in sampled])

    def _on_gang_failure(self, err: GangError, inflight: deque) -> None:
        log.error("gang failure: %s", err)
        self._healthy, self._last_error = False, str(err)
        inflight.clear()
        self._fail_all(f"request failed: {err}")
        if self._gang is not None:
            self._gang.kill()
        try:
            self._build()
            log.info("engine rebuilt after: %s", err)
        except Exception as rebuild_err:  # stays unhealthy; requests are refused with the reason
            self._last_error = f"{err}; rebuild failed: {rebuild_err}"
            log.error("rebuild failed: %s", rebuild_err)
            time.sleep(1.0)

    def _fail_all(self, message: str) -> None:
        with self._lock:
            streams, self._streams = self._streams, {}
            self._incoming.clear()
        for stream in streams.values():
            stream.fail(message)
