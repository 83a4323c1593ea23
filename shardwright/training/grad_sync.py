"""Gradient reductions outside the model: across data-parallel replicas, and between the two
copies of tied embeddings when they sit on different pipeline stages.

DP: `DataParallelGrads` SUMS each gradient over the DP group, overlapped with backward: a
post-accumulate-grad hook counts each parameter's accumulations during a step and, at the m-th
(its last micro-batch), starts an asynchronous all-reduce of that gradient while backward goes on
through earlier layers; `wait()` completes them before clipping. Summing is right because each
rank's loss is already divided by the GLOBAL token count (see parallel.pipeline), so the sum of
the replicas' gradients is exactly the gradient of the global-batch mean (the "average" of the
replicas' per-rank-normalised gradients, with each rank weighted by its token count).

Tied embeddings with pp > 1: the first stage's embedding and the last stage's LM-head copy start
equal (both loaded from the embedding tensor); `TiedEmbeddings` sums their gradients over a
two-rank group per (dp, cp, tp) position, so both take identical AdamW steps and stay equal.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from shardwright.config import ModelSpec
from shardwright.models.decoder import DecoderModel
from shardwright.parallel.context import ParallelContext, axis_groups


class DataParallelGrads:
    """Sum of gradients over `group`, started per parameter as soon as its last grad is in."""

    def __init__(self, params: list[torch.nn.Parameter], group: dist.ProcessGroup | None,
                 num_micro_batches: int) -> None:
        self.group, self.num_micro_batches = group, num_micro_batches
        self.params = params
        self._counts: dict[int, int] = {}
        self._works: list[dist.Work] = []
        self._hooks = []
        if group is not None:
            self._hooks = [p.register_post_accumulate_grad_hook(self._on_grad) for p in params]

    def _on_grad(self, param: torch.Tensor) -> None:
        count = self._counts.get(id(param), 0) + 1
        self._counts[id(param)] = count
        if count == self.num_micro_batches:
            self._works.append(dist.all_reduce(param.grad, group=self.group, async_op=True))

    def close(self) -> None:
        """Complete pending reductions and remove the hooks (they hold this object and its group)."""
        for work in self._works:
            work.wait()
        self._works.clear()
        for hook in self._hooks:
            hook.remove()
        self._hooks = []

    def start_step(self) -> None:
        """Call before the step's first backward."""
        self._counts.clear()
        self._works.clear()

    def wait(self) -> None:
        """Complete every all-reduce of the step; every parameter must have had m gradients."""
        for work in self._works:
            work.wait()
        if self.group is None:
            return
        short = [tuple(p.shape) for p in self.params if self._counts.get(id(p), 0) != self.num_micro_batches]
        if short:
            raise RuntimeError(f"{len(short)} parameters (shapes {short[:3]}) did not get "
                               f"{self.num_micro_batches} gradients this step: DP replicas would diverge")


class TiedEmbeddings:
    """The embedding / LM-head pair of a tied model split across pipeline stages."""

    def __init__(self, spec: ModelSpec, ctx: ParallelContext) -> None:
        """Collective over the world (creates every pair's group) when tied and pp > 1."""
        self.group: dist.ProcessGroup | None = None
        self.active = spec.tie_word_embeddings and ctx.pp > 1
        if not self.active:
            return
        for ranks in axis_groups(ctx.layout, "pp"):
            pair = [ranks[0], ranks[-1]]
            group = dist.new_group(pair)
            if ctx.rank in pair:
                self.group = group

    def param(self, model: DecoderModel) -> torch.nn.Parameter | None:
        """This rank's copy (embedding on the first stage, LM head on the last), if any."""
        if not self.active:
            return None
        if model.ctx.is_first_stage:
            return model.embed.weight
        return model.lm_head.weight if model.ctx.is_last_stage else None

    def norm_skip(self, model: DecoderModel) -> frozenset[str]:
        """Parameters the global norm must not count twice: the last stage's LM-head copy."""
        return frozenset({"lm_head.weight"}) if self.active and model.ctx.is_last_stage else frozenset()

    def all_reduce(self, model: DecoderModel) -> None:
        """Sum the two copies' gradients (after the DP reduction)."""
        param = self.param(model)
        if param is not None and param.grad is not None:
            dist.all_reduce(param.grad, group=self.group)
