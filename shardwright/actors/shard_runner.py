"""ShardRunner: the work of one ShardWorker, as a plain object (testable without Ray).

Start-up runs in named phases — `init_group`, `load`, `allocate_cache` — and a failure names the
phase and the rank. A step receives the controller's plan (plain lists), runs this rank's shard
over the packed tokens, passes hidden states to the next pipeline stage worker to worker
(torch.distributed send/recv, never through the controller), and on the last stage samples.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from shardwright.actors.compute_thread import any_thread
from shardwright.actors.group_member import GroupMember
from shardwright.serving.sampling import SamplingParams, sample_tokens, token_logprobs
from shardwright.serving.draft_model import DraftStep, fill_drafts, run_draft
from shardwright.serving.speculative import verify_rows
from shardwright.config import ParallelLayout
from shardwright.models import load_model
from shardwright.models.packed import pack_model
from shardwright.models.paged import PagedBatch
from shardwright.pool.fetch import CallSource, LayerFetcher, TensorSource
from shardwright.pool.kv_host import HostKVStore
from shardwright.pool.ledger import MemoryLedger
from shardwright.pool.sizing import ShardSizes, shard_sizes, tensor_bytes
from shardwright.pool.store import map_segment


@dataclass
class StepMessage:
    """One step of the controller's plan, as sent to every worker of the gang."""

    token_ids: list[int]
    positions: list[int]
    slot_mapping: list[int]
    query_lens: list[int]
    block_tables: list[list[int]]
    sample_index: list[int]
    sampling: list[SamplingParams] = field(default_factory=list)  # one per sampled token
    seeds: list[int] = field(default_factory=list)
    steps: list[int] = field(default_factory=list)
    # Async scheduling (one pipeline stage): token_ids[feedback_index[i]] is the token this rank
    # sampled for seq feedback_seq[i] in the previous step; sampled_seq names each sampled row.
    feedback_index: list[int] = field(default_factory=list)
    feedback_seq: list[int] = field(default_factory=list)
    sampled_seq: list[int] = field(default_factory=list)
    # Penalties: per sampled row, the sequence's tokens before its chunk (empty when the row has
    # none); the whole list is empty when no row has penalties. See `histories()`.
    contexts: list[list[int]] = field(default_factory=list)
    # Speculative decoding: per sampled row, how many of its chunk's last tokens are drafts to
    # verify (serving/speculative.py); empty when the step has none. BiLD's rollback threshold.
    draft_lens: list[int] = field(default_factory=list)
    rollback_threshold: float | None = None
    # method=draft: the draft model's catch-up batch and drafted chunks (serving/draft_model.py);
    # their chunks hold placeholder drafts, replaced (and trimmed) by the drafts made this step.
    draft: DraftStep | None = None
    # KV spilling (serving/kv_spill.py): (kind, seq_id, blocks) copies run, in order, before the
    # step's forward: 'spill' to host memory, 'restore' back into new blocks, 'drop'.
    kv_ops: list[tuple[str, int, list[int]]] = field(default_factory=list)

    @classmethod
    def from_plan(cls, plan, *, lookahead: bool = False, rollback_threshold: float | None = None,
                  draft: DraftStep | None = None) -> StepMessage:
        """The message of one StepPlan (serving.batching): `lookahead` names each sampled row's
        sequence for the workers' feedback; `draft` is the draft model's part (DraftTracker.plan)."""
        sampled = plan.sampled_chunks()
        feedback_index, feedback_seq = plan.feedback()
        return cls(
            feedback_index=feedback_index, feedback_seq=feedback_seq,
            sampled_seq=[c.seq_id for c in sampled] if lookahead else [],
            token_ids=plan.token_ids(), positions=plan.positions(), slot_mapping=plan.slot_mapping(),
            query_lens=plan.query_lens, block_tables=[c.block_table for c in plan.chunks],
            sample_index=plan.sample_indices(), sampling=[c.params for c in sampled],
            seeds=[c.seed for c in sampled], steps=[c.step for c in sampled],
            contexts=[list(c.context) for c in sampled] if any(c.params.penalized for c in sampled) else [],
            draft_lens=[c.num_draft for c in sampled] if any(c.num_draft for c in sampled) else [],
            rollback_threshold=rollback_threshold, draft=draft,
            kv_ops=[(o.kind, o.seq_id, list(o.blocks)) for o in plan.spill_ops])

    def logit_rows(self) -> list[int]:
        """Packed indices whose logits the step needs: each sampled row's, and with drafts the
        k positions before it too (a verified chunk's k + 1 rows, in order)."""
        if not self.draft_lens:
            return self.sample_index
        return [j for i, k in zip(self.sample_index, self.draft_lens) for j in range(i - k, i + 1)]

    def drafts(self) -> list[list[int]]:
        """Per sampled row, its draft tokens (the chunk's last draft_lens tokens)."""
        return [self.token_ids[i - k + 1:i + 1] if k else [] for i, k in zip(self.sample_index, self.draft_lens)]

    def histories(self) -> list[list[int]] | None:
        """Per sampled row, the request's tokens so far: its context, then its chunk's tokens
        (as the workers ran them, fed-back tokens filled in); None when no row has penalties."""
        if not self.contexts:
            return None
        start_of_end, at = {}, 0
        for n in self.query_lens:
            start_of_end[at + n - 1] = at
            at += n
        return [ctx + self.token_ids[start_of_end[i]: i + 1] if ctx or self.sampling[r].penalized else []
                for r, (ctx, i) in enumerate(zip(self.contexts, self.sample_index))]


def _with_logprobs(logits: torch.Tensor, tokens: list[int], msg: StepMessage):
    """The step's reply: the sampled tokens, or (tokens, per-row logprobs) when a row asks."""
    if not any(p.logprobs is not None for p in msg.sampling):
        return tokens
    return tokens, token_logprobs(logits, tokens, msg.sampling)


class ShardRunner(GroupMember):
    """One rank of a deployment's gang: process groups, weight shard, paged KV cache."""

    def __init__(self, rank: int, layout: ParallelLayout, *, threads_per_worker: int | None = None,
                 memory_budget_bytes: int | None = None, pack_weights: bool = True) -> None:
        super().__init__(rank, layout, threads_per_worker=threads_per_worker)
        self.pack_weights = pack_weights  # models.packed: oneDNN-packed CPU weights (bf16; fp32 on AVX-512)
        self.packed_weights = 0
        self.model = None
        self.cache = None
        self.block_size = 0
        from shardwright.parallel.context import default_device
        from shardwright.pool.ledger import resolve_budget

        self.ledger = MemoryLedger(resolve_budget(memory_budget_bytes, default_device()), owner=f"rank {rank}")
        self.sizes: ShardSizes | None = None
        self.fetcher: LayerFetcher | None = None
        self.host_bytes = 0
        self.kv_host: HostKVStore | None = None  # spilled KV blocks' copies (allocate_cache's spill_blocks)
        self._last_sampled: dict[int, int] = {}  # seq_id -> token sampled in the previous step
        self.draft_model = None  # speculative decoding's draft (serving/draft_model.py), sampler rank only
        self.draft_cache = None
        self._drafted: list[int] = []  # drafts made per drafted chunk in the current step

    def load(self, model_dir: str, dtype: str | None, pooled: dict | None = None, depth: int = 2,
             quant: tuple[str, int] | None = None) -> int:
        """Phase 2: read this rank's slice of the checkpoint; returns the resident weight bytes.

        `pooled` maps local layer -> where its weights live instead ({"path"...} of a same-node
        peer's segment, {"peer": handle, ...} of a peer elsewhere, or {"host": True}). On the CPU a
        same-node segment is mapped read-only and bound in place (not in this rank's ledger, no
        fetch thread); the others are fetched before each use by a background thread, which takes
        one of the rank's compute threads. `quant` = (method, group_size) quantizes the linears
        (models.load_model); each rank takes its slice of the global tensors' integers.
        """
        return self._phase("load", self._load, model_dir, dtype, pooled or {}, depth, quant)

    def _load(self, model_dir: str, dtype: str | None, pooled: dict, depth: int,
              quant: tuple[str, int] | None = None) -> int:
        from shardwright.config import ModelSpec

        spec = ModelSpec.from_hf_dir(model_dir, dtype=dtype)
        self.sizes = shard_sizes(spec, self.layout, self.rank)
        skip = frozenset(int(i) for i in pooled)
        resident = self.sizes.other_weight_bytes + sum(
            b for i, b in enumerate(self.sizes.layer_bytes) if i not in skip)
        self.ledger.reserve("weights", resident)
        method, group_size = quant or (None, 128)
        _, self.model = load_model(model_dir, self.ctx, dtype=dtype, skip_blocks=skip, quant=method,
                                   group_size=group_size)
        if self.pack_weights and not skip:  # pooled layers are bound from elsewhere: left unpacked;
            self.packed_weights = pack_model(self.model)  # quantized weights are not tensors: skipped
        if skip:
            sources = {int(i): self._source(int(i), where, model_dir, spec) for i, where in pooled.items()}
            self.fetcher = LayerFetcher(self.model.blocks, sources, self.ledger, self.ctx.device, depth)
            if self.fetcher.background and self.ctx.device.type == "cpu" and torch.get_num_threads() > 1:
                # The fetch thread needs a core of its own: an OpenMP team that loses a core to it
                # spins and stalls at every barrier (measured: noisy 1.3-1.9x slowdowns). Layers
                # bound in place from a same-node peer's segment need no thread and keep every core.
                self.set_num_threads(torch.get_num_threads() - 1)
            self.model.layer_weights = self.fetcher
        return resident

    def _source(self, layer: int, where: dict, model_dir: str, spec):
        if where.get("host"):  # this rank's own host memory (pinned on CUDA), outside the budget
            from shardwright.pool.store import PeerStore

            store = PeerStore(MemoryLedger(None, owner=f"rank {self.rank} host"), shared=False)
            store.load(model_dir, spec, self.layout, [(self.rank, layer)])
            flat = store.flat[(self.rank, layer)]
            flat = flat.pin_memory() if self.ctx.device.type == "cuda" else flat
            self.host_bytes += tensor_bytes([flat])
            return TensorSource(flat, store.shapes[(self.rank, layer)])
        if where.get("path") and self.ctx.device.type == "cpu":
            return map_segment(where)
        peer = where["peer"]  # another node (or CUDA): ask the peer actor for the tensors

        def call(peer=peer, key=(self.rank, layer)):
            import ray

            return ray.get(peer.call.remote("tensors", *key))

        return CallSource(call, where["shapes"], getattr(torch, where["dtype"]))

    def load_draft(self, model_dir: str, dtype: str | None) -> int:
        """Phase 2b (method=draft, the sampler rank only): the whole draft model; its bytes."""
        return self._phase("load_draft", self._load_draft, model_dir, dtype)

    def _load_draft(self, model_dir: str, dtype: str | None) -> int:
        from shardwright.parallel.context import ParallelContext

        spec, model = load_model(model_dir, ParallelContext.single(self.ctx.device), dtype=dtype)
        if spec.vocab_size != self.model.spec.vocab_size:
            raise ValueError(f"draft model {model_dir} has vocab_size={spec.vocab_size}, the target "
                             f"{self.model.spec.vocab_size}; a draft must share the target's tokenizer")
        nbytes = sum(t.numel() * t.element_size() for t in model.state_dict().values())
        self.ledger.reserve("draft_weights", nbytes)
        self.draft_model = model
        return nbytes

    def allocate_cache(self, num_blocks: int, block_size: int, spill_blocks: int = 0) -> int:
        """Phase 3: allocate the paged KV cache (and the draft model's); returns its bytes. With
        `spill_blocks`, host memory for that many spilled blocks' copies (pool/kv_host.py), on a
        host ledger of that many blocks' bytes."""
        if self.draft_model is not None:
            self.draft_cache = self._phase("allocate_cache", self.draft_model.new_paged_cache, num_blocks, block_size)
            self.ledger.reserve("draft_kv_cache", self.draft_cache.nbytes)
        self.block_size = block_size
        local_blocks = len(range(self.ctx.cp_rank, num_blocks, self.ctx.cp))  # CP shards the blocks
        nbytes = local_blocks * block_size * (self.sizes.kv_bytes_per_token if self.sizes else 0)
        self.ledger.reserve("kv_cache", nbytes)
        self.cache = self._phase("allocate_cache", self.model.new_paged_cache, num_blocks, block_size)
        if self.sizes is not None and self.cache.nbytes != nbytes:
            raise RuntimeError(f"rank {self.rank}: KV cache is {self.cache.nbytes} bytes, accounted {nbytes}")
        if spill_blocks:
            per_block = self.cache.nbytes // max(1, local_blocks)
            host = MemoryLedger(max(1, spill_blocks * per_block), owner=f"rank {self.rank} KV spill (host)")
            self.kv_host = HostKVStore(self.cache, host)
        return self.cache.nbytes

    @any_thread
    def memory(self) -> dict:
        """This rank's ledger (budget, resident bytes by kind, high-water mark) and, outside it, the
        pooled layers: bytes fetched and seconds fetching / waiting for fetches since load, and the
        bytes bound in place from same-node peers' segments (`bytes_mapped`, the peers' memory)."""
        from shardwright.parallel.context import default_device

        snap = self.ledger.snapshot()
        snap["host_bytes"] = self.host_bytes
        snap["device_type"] = default_device().type  # 'cpu': same-node pooled layers are bound in place
        snap.update(self.fetcher.traffic() if self.fetcher else
                    {"bytes_fetched": 0, "bytes_mapped": 0, "fetch_s": 0.0, "fetch_wait_s": 0.0})
        if self.kv_host is not None:
            snap.update(self.kv_host.traffic(), kv_spill_ledger=self.kv_host.ledger.snapshot())
        return snap

    @any_thread
    def reset_memory_peak(self) -> None:
        self.ledger.reset_high_water()

    def shutdown(self) -> None:
        """The fetch thread, then what holds the process groups (models, caches), then the world
        (GroupMember.shutdown: groups destroyed, their gloo threads joined before exit)."""
        if self.fetcher is not None:
            self.fetcher.close()
        self.fetcher = self.model = self.cache = self.draft_model = self.draft_cache = self.kv_host = None
        super().shutdown()

    def _activation_bytes(self, batch: PagedBatch, msg: StepMessage) -> int:
        if self.sizes is None:
            return 0
        lens = batch.context_lens
        decode = [c for q, c in zip(msg.query_lens, lens) if q == 1]
        prefill = [c for q, c in zip(msg.query_lens, lens) if q > 1]
        return self.sizes.activation_bytes(len(msg.token_ids), len(decode), max(decode, default=0),
                                           max(prefill, default=0))

    @torch.inference_mode()
    def step(self, msg: StepMessage) -> list[int] | None:
        """Run one packed step; the last stage's TP rank 0 returns the sampled token ids."""
        ctx = self.ctx
        if msg.feedback_index:
            token_ids = list(msg.token_ids)
            for i, seq in zip(msg.feedback_index, msg.feedback_seq):
                token_ids[i] = self._last_sampled[seq]
            msg.token_ids = token_ids
        if msg.kv_ops:
            self.kv_host.run(msg.kv_ops)
        draft_probs = self._draft(msg) if msg.draft is not None else None
        batch = PagedBatch.build(msg.token_ids, msg.positions, msg.slot_mapping, msg.query_lens,
                                 msg.block_tables, self.block_size, msg.logit_rows(), ctx.device)
        activations = self._activation_bytes(batch, msg)
        self.ledger.reserve("activations", activations)
        try:
            return self._step(msg, batch, draft_probs)
        finally:
            self.ledger.release("activations", activations)

    def _draft(self, msg: StepMessage) -> list | None:
        """method=draft: make this step's drafts (the sampler rank, which holds the draft model;
        broadcast to the other TP ranks) and put them into `msg`; per sampled row, q of its
        drafts (None for greedy or undrafted rows); None on ranks other than the sampler."""
        d, ctx = msg.draft, self.ctx
        ends = list(itertools.accumulate(msg.query_lens))
        row_of = {i: r for r, i in enumerate(msg.sample_index)}
        sampled_rows = [row_of[ends[i] - 1] for i in d.rows]
        probs_by_row = None
        if self.draft_model is not None:
            drafts, probs = run_draft(self.draft_model, self.draft_cache, d, self.block_size,
                                      [msg.sampling[r] for r in sampled_rows], [msg.seeds[r] for r in sampled_rows],
                                      [msg.steps[r] for r in sampled_rows])
            probs_by_row = dict(zip(sampled_rows, probs))
        if ctx.tp > 1:
            box = [drafts if self.draft_model is not None else None]
            dist.broadcast_object_list(box, src=ctx.group_ranks["tp"][0], group=ctx.tp_group)
            drafts = box[0]
        (msg.token_ids, msg.positions, msg.slot_mapping, msg.query_lens, msg.sample_index,
         msg.draft_lens) = fill_drafts(msg.token_ids, msg.positions, msg.slot_mapping, msg.query_lens,
                                       msg.sample_index, d.rows, drafts)
        self._drafted = [len(x) for x in drafts]
        if probs_by_row is None:
            return None
        return [probs_by_row.get(r) for r in range(len(msg.sample_index))]

    def _step(self, msg: StepMessage, batch: PagedBatch, draft_probs: list | None = None) -> list[int] | None:
        ctx = self.ctx
        if ctx.is_first_stage:
            x = batch.token_ids
        else:
            rows = batch.num_tokens if ctx.cp == 1 else batch.cp_share(self.cache).rows.numel()
            x = torch.empty(rows, self.model.spec.hidden_size, dtype=self.model.dtype, device=ctx.device)
            dist.recv(x, src=ctx.group_ranks["pp"][ctx.pp_rank - 1])
        out = self.model.forward_packed(x, batch, self.cache)
        if not ctx.is_last_stage:
            dist.send(out.contiguous(), dst=ctx.group_ranks["pp"][ctx.pp_rank + 1])
            return None
        logits = self.model.full_logits(out).float()
        if msg.draft_lens or msg.draft is not None:
            return self._verify(logits, msg, draft_probs) if ctx.tp_rank == 0 else None
        if msg.sampled_seq:  # async scheduling: every rank samples (identical logits, same seeds)
            tokens = sample_tokens(logits, msg.sampling, msg.seeds, msg.steps, msg.histories())
            self._last_sampled = dict(zip(msg.sampled_seq, tokens))
            return _with_logprobs(logits, tokens, msg) if ctx.tp_rank == 0 and ctx.cp_rank == 0 else None
        if ctx.tp_rank != 0:
            return None
        return _with_logprobs(logits, sample_tokens(logits, msg.sampling, msg.seeds, msg.steps, msg.histories()), msg)

    def _verify(self, logits: torch.Tensor, msg: StepMessage, draft_probs: list | None = None):
        """Sampling of a step with drafts: per sampled row a token, or (rows with drafts) the
        accepted drafts and the next token (speculative.verify_rows). With a draft model the reply
        is (tokens, logprobs or None, drafts made per drafted chunk)."""
        histories = msg.histories()
        if histories is not None:  # verify_rows wants the history up to each chunk's first token
            histories = [h[:len(h) - k] if h else h for h, k in zip(histories, msg.draft_lens)]
        tokens = verify_rows(logits, msg.sampling, msg.seeds, msg.steps, msg.drafts(), histories,
                             draft_probs, rollback_threshold=msg.rollback_threshold)
        ends = list(itertools.accumulate(k + 1 for k in msg.draft_lens))
        reply = _with_logprobs(logits[[e - 1 for e in ends]], tokens, msg)  # logprobs: rows without drafts
        if msg.draft is None:
            return reply
        tokens, logprobs = reply if isinstance(reply, tuple) else (reply, None)
        return tokens, logprobs, self._drafted

    @torch.inference_mode()
    def prompt_logits(self, token_ids: list[int]) -> torch.Tensor | None:
        """Uncached forward of one prompt; the last stage's TP rank 0 returns [tokens, vocab] fp32 CPU."""
        n = len(token_ids)
        activations = self.sizes.activation_bytes(n, 0, 0, n) if self.sizes else 0
        self.ledger.reserve("activations", activations)
        try:
            return self._prompt_logits(token_ids)
        finally:
            self.ledger.release("activations", activations)

    def _prompt_logits(self, token_ids: list[int]) -> torch.Tensor | None:
        ctx = self.ctx
        ids = torch.tensor([token_ids], dtype=torch.long, device=ctx.device)
        positions = torch.arange(len(token_ids), device=ctx.device).unsqueeze(0)
        if ctx.is_first_stage:
            x = ids
        else:
            x = torch.empty(1, len(token_ids), self.model.spec.hidden_size, dtype=self.model.dtype,
                            device=ctx.device)
            dist.recv(x, src=ctx.group_ranks["pp"][ctx.pp_rank - 1])
        out = self.model(x, positions)
        if not ctx.is_last_stage:
            dist.send(out.contiguous(), dst=ctx.group_ranks["pp"][ctx.pp_rank + 1])
            return None
        logits = self.model.full_logits(out)[0].float().cpu()
        return logits if ctx.tp_rank == 0 else None
