"""TrainerRank: the work of one rank of a training job, as a plain object (testable without Ray).

Start-up runs in named phases — `init_context`, `build_model`, `build_optimizer`, `build_data`
(or `start` for all four) — and a failure names the phase and the rank. Every rank of the
job's torch.distributed world (tp * pp * cp * dp ranks) holds one and calls the same methods in
the same order; `build_model`, `train_step`, `save` and `load` are collective.

One `train_step()`: the next global batch (this DP rank's slice) cut into m micro-batches, a
pipeline schedule (1F1B or GPipe) over this rank's TP shard of its stage (with cp > 1 each
micro-batch packed into one row of which this CP rank holds the zigzag share, attention being
ring attention over the CP group), gradients summed over DP and CP (overlapped with the last
micro-batch's backward) and between tied embedding copies, global
norm clipping, AdamW with the scheduled LR. The loss is the mean over the global batch's tokens,
equal to the single-process loss on the same batch (see parallel.pipeline for the scaling).
"""

from __future__ import annotations

import tempfile
import time
from contextlib import nullcontext
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from shardwright.config import ModelSource, ModelSpec, ParallelLayout, TrainConfig
from shardwright.models import load_model
from shardwright.models.moe import load_balancing_loss, record_router_logits
from shardwright.models.tokenizer import ByteTokenizer, load_tokenizer
from shardwright.parallel.attention.plan import make_shard_plan
from shardwright.parallel.context import ParallelContext, StartupError
from shardwright.parallel.loss import IGNORE_INDEX, vocab_parallel_cross_entropy
from shardwright.parallel.pipeline import MicroBatch, PipelineSchedule, PipelineStats
from shardwright.training.checkpoint import (choose_checkpoint, load_checkpoint, read_manifest, restore_rng,
                                             save_checkpoint)
from shardwright.training.data import PackedLoader, build_loader
from shardwright.training.grad_sync import DataParallelGrads, TiedEmbeddings
from shardwright.training.offload import OffloadedAdamW, adamw_state_bytes
from shardwright.training.optim import (OwnedRows, build_optimizer, clip_grads_, global_grad_norm,
                                       lr_at, owned_rows, set_lr)

class TrainerRank:
    """One rank of a training job: context, model shard, optimizer, data, step counter."""

    def __init__(self, config: TrainConfig, layout: ParallelLayout) -> None:
        _check_config(config, layout)
        self.config, self.layout = config, layout
        self.ctx: ParallelContext | None = None
        self.spec: ModelSpec | None = None
        self.model = None
        self.optimizer: torch.optim.AdamW | OffloadedAdamW | None = None
        self.data: PackedLoader | None = None
        self.tokenizer_dir: str | None = None
        self.tied: TiedEmbeddings | None = None
        self.grad_sync: DataParallelGrads | None = None
        self.pipeline: PipelineSchedule | None = None
        self.params: list[torch.nn.Parameter] = []
        self.owned: OwnedRows = []
        self.step = 0
        self.checkpoint: Path | None = None  # the checkpoint loaded (after load)

    def _phase(self, name: str, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except Exception as err:
            rank = self.ctx.rank if self.ctx is not None else "?"
            raise StartupError(f"trainer rank {rank} failed in start-up phase '{name}': {err}") from err

    def start(self, source: ModelSource, device: torch.device | str | None = None,
              ctx: ParallelContext | None = None) -> TrainerRank:
        """Every start-up phase in order; returns self. `ctx`: the process groups the caller already
        built for this world (a gang worker's), used as they are instead of building them again."""
        self.init_context(device, ctx)
        self.build_model(source)
        self.build_optimizer()
        self.build_data()
        return self

    def init_context(self, device: torch.device | str | None = None,
                     ctx: ParallelContext | None = None) -> ParallelContext:
        """Phase 1: the ParallelContext of the initialised world (one process: no groups); `ctx`
        when given (its layout must be this trainer's)."""
        if ctx is not None and ctx.layout != self.layout:
            raise StartupError(f"trainer: the given context's layout {ctx.layout} is not this job's {self.layout}")
        self.ctx = ctx if ctx is not None else self._phase("init_context", _make_context, self.layout, device)
        return self.ctx

    def build_model(self, source: ModelSource) -> int:
        """Phase 2 (collective): this rank's shard from a HF directory or a seeded random preset."""
        return self._phase("build_model", self._build_model, source)

    def _build_model(self, source: ModelSource) -> int:
        if source.path is not None:
            self.spec, self.model = load_model(source.path, self.ctx)
            self.tokenizer_dir = str(source.path)
        else:
            self.spec, self.model = _random_model(source, self.ctx)
        self.model.train()
        if self.aux_loss_coef and (not self.spec.num_experts or self.ctx.pp > 1):
            raise ValueError(f"router_aux_loss_coef={self.aux_loss_coef} needs a mixture-of-experts model and pp=1 "
                             f"(got num_experts={self.spec.num_experts}, pp={self.ctx.pp}): its statistics span "
                             "every layer; set train.router_aux_loss_coef: 0 or use pp=1")
        if self.config.data.seq_len > self.spec.max_position_embeddings:
            raise ValueError(f"seq_len={self.config.data.seq_len} exceeds the model's "
                             f"max_position_embeddings={self.spec.max_position_embeddings}")
        self.tied = TiedEmbeddings(self.spec, self.ctx)
        self.params = list(self.model.parameters())
        self.owned = owned_rows(self.model, self.ctx, skip=self.tied.norm_skip(self.model))
        self.grad_sync = DataParallelGrads(self.params, self.ctx.dp_cp_group, self.config.num_micro_batches)
        self.pipeline = PipelineSchedule(self.ctx, hidden_size=self.spec.hidden_size, dtype=self.model.dtype,
                                         schedule=self.config.schedule)
        return sum(p.numel() for p in self.params)

    def build_optimizer(self) -> None:
        """Phase 3: AdamW over the shard's parameters."""
        if self.config.offload_optimizer > 0:
            self.optimizer = self._phase("build_optimizer", OffloadedAdamW, self.model, self.config.optim,
                                         self.config.offload_optimizer)
        else:
            self.optimizer = self._phase("build_optimizer", build_optimizer, self.model, self.config.optim)

    def optimizer_bytes(self) -> dict[str, int]:
        """AdamW state bytes in device memory and in host memory (offload's masters included)."""
        if isinstance(self.optimizer, OffloadedAdamW):
            return self.optimizer.state_bytes()
        return adamw_state_bytes(self.optimizer)

    def build_data(self) -> int:
        """Phase 4: tokenise and pack the corpus; returns the number of sequences."""
        self.data = self._phase("build_data", self._build_data)
        return self.data.windows.shape[0]

    def _build_data(self) -> PackedLoader:
        """The model directory's tokenizer.json, raw bytes when there is none (random presets)."""
        tokenizer = load_tokenizer(self.tokenizer_dir) if self.tokenizer_dir else ByteTokenizer()
        return build_loader(self.config.data, tokenizer, self.spec.vocab_size,
                            dp_rank=self.ctx.dp_rank, dp=self.ctx.dp)

    def train_step(self) -> dict[str, float]:
        """One optimizer step (collective). loss, grad_norm, lr and tokens are the same on every rank;
        step_time_s, tokens_per_s and mfu are this rank's wall time; bubble_measured is the mean
        over ranks."""
        if self.data is None or self.optimizer is None:
            raise RuntimeError("train_step before start(): run the start-up phases first")
        start = time.perf_counter()
        micro = self._micro_batches(*self.data.next_batch())
        num_tokens = self._global_token_count(micro)
        self.optimizer.zero_grad(set_to_none=True)
        self.grad_sync.start_step()
        stats = self.pipeline.run(self._stage_forward(num_tokens), micro)
        self.grad_sync.wait()
        self.tied.all_reduce(self.model)
        norm = global_grad_norm(self.owned, self.ctx)
        clip_grads_(self.params, norm, self.config.optim.max_grad_norm)
        lr = lr_at(self.step, self.config.optim)
        set_lr(self.optimizer, lr)
        self.optimizer.step()
        self.step += 1
        loss, bubble = self._reduce_metrics(stats)
        return self._metrics(loss, norm, lr, num_tokens, time.perf_counter() - start, bubble, stats)

    def _micro_batches(self, inputs: torch.Tensor, targets: torch.Tensor) -> list[MicroBatch]:
        dev, m = self.ctx.device, self.config.num_micro_batches
        positions = torch.arange(inputs.shape[1]).expand_as(inputs)
        micro = [MicroBatch(i.to(dev), t.to(dev), p.to(dev))
                 for i, t, p in zip(inputs.chunk(m), targets.chunk(m), positions.chunk(m))]
        return [self._cp_share(mb) for mb in micro] if self.ctx.cp > 1 else micro

    def _cp_share(self, mb: MicroBatch) -> MicroBatch:
        """Context parallel: the micro-batch packed into one row, this CP rank's zigzag share of
        every sequence (ring attention balances causal work over the ranks)."""
        b, t = mb.inputs.shape
        plan = make_shard_plan([i * t for i in range(b + 1)], self.ctx.cp, split="zigzag")
        index = plan.token_index(self.ctx.cp_rank).to(mb.inputs.device)

        def share(x: torch.Tensor) -> torch.Tensor:
            return x.reshape(-1).index_select(0, index).unsqueeze(0)

        return MicroBatch(share(mb.inputs), share(mb.targets), share(mb.positions), plan)

    def _global_token_count(self, micro: list[MicroBatch]) -> int:
        local = sum(int((mb.targets != IGNORE_INDEX).sum()) for mb in micro)
        count = torch.tensor(local, device=self.ctx.device)
        if self.ctx.dp_cp_group is not None:
            dist.all_reduce(count, group=self.ctx.dp_cp_group)
        return int(count)

    def _stage_forward(self, num_tokens: int) -> Callable[[torch.Tensor, MicroBatch], torch.Tensor]:
        """Stage forward under the configured precision; the last stage returns sum(CE) / N, plus
        the router's load-balancing loss when the model or the run asks for it (`aux_loss_coef`)."""
        ctx, model = self.ctx, self.model
        bf16 = self.config.precision == "bfloat16"
        coef = self.aux_loss_coef
        shards = self.config.num_micro_batches * ctx.dp * ctx.cp

        def forward(x: torch.Tensor, mb: MicroBatch) -> torch.Tensor:
            with torch.autocast(ctx.device.type, dtype=torch.bfloat16, enabled=bf16), \
                    record_router_logits(model) if coef else nullcontext([]) as router_logits:
                out = model(x, mb.positions, plan=mb.plan)
            if not ctx.is_last_stage:
                return out.to(model.dtype)
            losses = vocab_parallel_cross_entropy(out, mb.targets, vocab_start=model.vocab_rows.start,
                                                  group=ctx.tp_group)
            loss = losses.sum() / max(num_tokens, 1)
            if coef:
                loss = loss + coef * aux_loss(router_logits, self.spec) / shards
            return loss

        return forward

    @property
    def aux_loss_coef(self) -> float:
        """Weight of the router's load-balancing loss: the run's `router_aux_loss_coef`, else the model's.

        Each micro-batch's loss (over its rows on this DP and CP rank: transformers' on that batch) is
        divided by m * dp * cp, so the summed loss and gradients carry their mean; at m = dp = cp = 1
        the loss is transformers' `loss` with output_router_logits."""
        coef = self.config.router_aux_loss_coef
        return self.spec.router_aux_loss_coef if coef is None else coef

    def _reduce_metrics(self, stats: PipelineStats) -> tuple[float, float]:
        """(global mean loss, bubble averaged over ranks): one all-reduce over the world."""
        ctx = self.ctx
        holder = ctx.is_last_stage and ctx.tp_rank == 0 and ctx.ep_rank == 0  # each DP and CP rank: its share
        values = torch.tensor([stats.loss if holder else 0.0, stats.bubble_measured], dtype=torch.float64)
        if dist.is_initialized() and ctx.world_size > 1:
            values = values.to(ctx.device)
            dist.all_reduce(values)
        return float(values[0]), float(values[1]) / ctx.world_size

    def _metrics(self, loss: float, norm: float, lr: float, tokens: int, elapsed: float, bubble: float,
                 stats: PipelineStats) -> dict[str, float]:
        tokens_per_s = tokens / elapsed
        flops_per_s = 6.0 * self.spec.num_parameters * tokens_per_s
        return {"step": self.step, "loss": loss, "grad_norm": norm, "lr": lr, "tokens": tokens,
                "step_time_s": elapsed, "tokens_per_s": tokens_per_s,
                "mfu": flops_per_s / self.config.peak_flops_per_s,
                "bubble_measured": bubble, "bubble_formula": stats.bubble_formula}

    def close(self) -> None:
        """Release what outlives a step: the gradient hooks with their pending reductions, the
        offloaded optimizer's thread. Call before the world is destroyed; idempotent."""
        if self.grad_sync is not None:
            self.grad_sync.close()
        if isinstance(self.optimizer, OffloadedAdamW):
            self.optimizer.close()

    def save(self, root: str | Path) -> Path:
        """Checkpoint ROOT/step-N (collective, crash-safe), keep the last K; returns its path."""
        return save_checkpoint(root, ctx=self.ctx, model=self.model, optimizer=self.optimizer,
                               step=self.step, spec=self.spec, data_state=self.data.state_dict(),
                               tokenizer_dir=self.tokenizer_dir, keep=self.config.keep_checkpoints)

    def load(self, checkpoint: str | Path) -> int:
        """Continue from a checkpoint directory, or the latest complete one under a root; the step.

        A named checkpoint that is missing, incomplete or corrupt falls back to the newest complete
        one beside it (`choose_checkpoint`: the ranks share the sha256 checks and agree).
        `self.checkpoint` is the one loaded.
        """
        path = choose_checkpoint(checkpoint, ctx=self.ctx)
        if path is None:
            raise FileNotFoundError(f"no complete checkpoint at {checkpoint}, beside it or under it")
        _check_same_model(read_manifest(path).model, self.spec, path)
        manifest = load_checkpoint(path, ctx=self.ctx, model=self.model, optimizer=self.optimizer, verify=False)
        if isinstance(self.optimizer, OffloadedAdamW):
            self.optimizer.sync_host_params()
        self.data.load_state_dict(manifest.data)
        restore_rng(manifest, self.ctx.rank)
        self.step, self.checkpoint = manifest.step, path
        return self.step


def _check_config(config: TrainConfig, layout: ParallelLayout) -> None:
    config.check_layout(layout)


def _make_context(layout: ParallelLayout, device: torch.device | str | None) -> ParallelContext:
    if dist.is_initialized():
        return ParallelContext.from_initialized(layout, device)
    if layout.world_size != 1:
        raise RuntimeError(f"layout {layout} needs {layout.world_size} ranks but torch.distributed is not "
                           "initialised; call dist.init_process_group on every rank first")
    return ParallelContext.single(device)


def _random_model(source: ModelSource, ctx: ParallelContext):
    """A preset's shape with seeded random weights (each rank writes and reads its own copy)."""
    from shardwright.models.presets import preset_spec
    from shardwright.models.random_init import write_random_checkpoint

    with tempfile.TemporaryDirectory(prefix="shardwright-init-") as tmp:
        write_random_checkpoint(tmp, preset_spec(source.preset), seed=source.seed)
        spec, model = load_model(tmp, ctx)
    return spec.model_copy(update={"checkpoint_path": None}), model


def _check_same_model(saved: ModelSpec, mine: ModelSpec, path: Path) -> None:
    a, b = (s.model_dump(exclude={"checkpoint_path"}) for s in (saved, mine))
    diff = sorted(k for k in a if a[k] != b[k])
    if diff:
        changes = ", ".join(f"{k}={a[k]} (running {b[k]})" for k in diff)
        raise ValueError(f"checkpoint {path} holds a different model: {changes}; load it with that model")


def aux_loss(router_logits: list[torch.Tensor], spec: ModelSpec) -> torch.Tensor:
    """The router's load-balancing loss of one forward (0 when no layer routed)."""
    if not router_logits:
        return torch.zeros(())
    return load_balancing_loss(router_logits, spec.num_experts, spec.experts_per_token)
