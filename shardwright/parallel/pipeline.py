"""Pipeline-parallel schedules over m micro-batches: GPipe and 1F1B (PipeDream-Flush).

Each rank runs one stage of the model. Activations [b, T, hidden] go to the next stage and their
gradients come back by torch.distributed point-to-point ops between the TP-matching ranks of
neighbouring stages (`ctx.group_ranks["pp"]`); shapes are known from the micro-batch, so nothing
but the tensors themselves is sent. With pp = 1 both schedules are plain gradient accumulation.

- GPipe: all m forwards, then all m backwards (in micro-batch order 0..m-1, so that each
  parameter's gradient is accumulated in the same order as under 1F1B: the two schedules give
  bitwise-equal gradients).
- 1F1B: stage s runs min(p - s - 1, m) warm-up forwards, then alternates one forward and one
  backward, then drains the remaining backwards; at most p - s micro-batches are in flight.
  Paired sends and receives are posted together (`batch_isend_irecv`) so neighbours never wait
  on each other's blocking send.

Both have the bubble (p - 1) / (m + p - 1) when every forward and backward takes the same time.
The measured figure is idle / total per stage: total is the wall time of `run`, busy the time
spent inside forward and backward computations (TP collectives included), idle the rest (waiting
for a neighbour's activation or gradient).

Loss scaling is the caller's: the last stage's `forward` returns a scalar whose gradient is the
one wanted. To get exactly the gradient of the global-batch mean (mean over the non-ignored
tokens of all micro-batches of all DP ranks), return `sum of token losses / N` where N is the
global count of non-ignored tokens, and SUM (not average) the gradients over DP.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist

from shardwright.config import Schedule
from shardwright.parallel.context import ParallelContext

SCHEDULES: tuple[Schedule, ...] = ("gpipe", "1f1b")


@dataclass(frozen=True)
class MicroBatch:
    """One micro-batch: inputs (token ids) [b, T], targets [b, T], positions [b, T] (int64)."""

    inputs: torch.Tensor
    targets: torch.Tensor
    positions: torch.Tensor
    plan: object | None = None  # context parallel: the ShardPlan of the packed batch (inputs [1, local])


# forward(x, mb): x is mb.inputs on the first stage, the received activation [b, T, hidden]
# elsewhere. Returns the activation for the next stage, or on the last stage the scalar loss.
StageForward = Callable[[torch.Tensor, MicroBatch], torch.Tensor]


def bubble_formula(num_stages: int, num_micro_batches: int) -> float:
    """The ideal pipeline bubble (p - 1) / (m + p - 1) of GPipe and 1F1B."""
    return (num_stages - 1) / (num_micro_batches + num_stages - 1)


@dataclass(frozen=True)
class PipelineStats:
    """What one `run` did on this stage.

    loss: sum of the last stage's forward results over the micro-batches (0.0 on other stages).
    busy_s: time inside forward and backward computations; total_s: wall time of the run.
    """

    schedule: Schedule
    num_stages: int
    num_micro_batches: int
    loss: float
    busy_s: float
    total_s: float

    @property
    def bubble_measured(self) -> float:
        """Idle fraction of this stage: 1 - busy / total."""
        return max(0.0, 1.0 - self.busy_s / self.total_s) if self.total_s > 0 else 0.0

    @property
    def bubble_formula(self) -> float:
        return bubble_formula(self.num_stages, self.num_micro_batches)


class PipelineSchedule:
    """Runs forward and backward of m micro-batches on this rank's stage.

    Every stage of a pipeline must call `run` with the same number of micro-batches of the same
    shapes. Gradients accumulate into the parameters' `.grad` (call zero_grad before).
    """

    def __init__(self, ctx: ParallelContext, *, hidden_size: int, dtype: torch.dtype,
                 schedule: Schedule = "1f1b") -> None:
        if schedule not in SCHEDULES:
            raise ValueError(f"schedule={schedule!r} is unknown; choose one of {SCHEDULES}")
        self.ctx, self.hidden_size, self.dtype, self.schedule = ctx, hidden_size, dtype, schedule

    def run(self, forward: StageForward, micro_batches: list[MicroBatch]) -> PipelineStats:
        """Forward and backward of every micro-batch; returns this stage's timings and loss."""
        if not micro_batches:
            raise ValueError("run needs at least one micro-batch, got 0")
        stage = _StageRun(self.ctx, forward, micro_batches, self.hidden_size, self.dtype)
        start = time.perf_counter()
        if self.schedule == "gpipe":
            _gpipe(stage)
        else:
            _one_f_one_b(stage)
        total = time.perf_counter() - start
        return PipelineStats(self.schedule, self.ctx.pp, len(micro_batches), stage.loss_value(),
                             stage.busy_s, total)


def _gpipe(s: _StageRun) -> None:
    """All forwards, then all backwards in micro-batch order (see the module doc)."""
    for i in range(s.m):
        s.send_forward(s.forward(i, s.recv_forward(i)))
    for i in range(s.m):
        s.send_backward(s.backward(i, s.recv_backward(i)))


def _one_f_one_b(s: _StageRun) -> None:
    """Warm-up forwards, then one forward / one backward pairs, then the remaining backwards."""
    warmup = min(s.ctx.pp - s.ctx.pp_rank - 1, s.m)
    for i in range(warmup):
        s.send_forward(s.forward(i, s.recv_forward(i)))
    steady = s.m - warmup
    x = s.recv_forward(warmup) if steady > 0 else None
    for k in range(steady):
        grad = s.send_forward_recv_backward(s.forward(warmup + k, x), k)
        dx = s.backward(k, grad)
        if k == steady - 1:
            s.send_backward(dx)
        else:
            x = s.send_backward_recv_forward(dx, warmup + k + 1)
    for i in range(steady, s.m):
        s.send_backward(s.backward(i, s.recv_backward(i)))


def _exchange(sends: list[tuple[torch.Tensor, int]], recvs: list[tuple[torch.Tensor, int]]) -> None:
    """Post every send and receive together, then wait for all of them."""
    ops = [dist.P2POp(dist.isend, t, peer) for t, peer in sends]
    ops += [dist.P2POp(dist.irecv, t, peer) for t, peer in recvs]
    if ops:
        for work in dist.batch_isend_irecv(ops):
            work.wait()


class _StageRun:
    """The state of one `run` on one stage: saved inputs/outputs per micro-batch, timers."""

    def __init__(self, ctx: ParallelContext, forward: StageForward, mbs: list[MicroBatch],
                 hidden: int, dtype: torch.dtype) -> None:
        self.ctx, self.fn, self.mbs, self.hidden, self.dtype = ctx, forward, mbs, hidden, dtype
        self.m = len(mbs)
        ranks = ctx.group_ranks.get("pp", [ctx.rank])
        self.prev = None if ctx.is_first_stage else ranks[ctx.pp_rank - 1]
        self.next = None if ctx.is_last_stage else ranks[ctx.pp_rank + 1]
        self.inputs: dict[int, torch.Tensor] = {}
        self.outputs: dict[int, torch.Tensor] = {}
        self.busy_s = 0.0
        self._loss: torch.Tensor | None = None

    def _activation(self, i: int) -> torch.Tensor:
        shape = (*self.mbs[i].inputs.shape, self.hidden)
        return torch.empty(shape, dtype=self.dtype, device=self.ctx.device)

    def _received(self, x: torch.Tensor) -> torch.Tensor:
        return x.requires_grad_(True)

    def recv_forward(self, i: int) -> torch.Tensor:
        if self.prev is None:
            return self.mbs[i].inputs
        x = self._activation(i)
        _exchange([], [(x, self.prev)])
        return self._received(x)

    def recv_backward(self, i: int) -> torch.Tensor | None:
        if self.next is None:
            return None
        grad = self._activation(i)
        _exchange([], [(grad, self.next)])
        return grad

    def send_forward(self, y: torch.Tensor | None) -> None:
        if self.next is not None:
            _exchange([(y, self.next)], [])

    def send_backward(self, dx: torch.Tensor | None) -> None:
        if self.prev is not None:
            _exchange([(dx, self.prev)], [])

    def send_forward_recv_backward(self, y: torch.Tensor, i: int) -> torch.Tensor | None:
        """Send micro-batch i+warmup's activation; receive micro-batch i's output gradient."""
        if self.next is None:
            return None
        grad = self._activation(i)
        _exchange([(y, self.next)], [(grad, self.next)])
        return grad

    def send_backward_recv_forward(self, dx: torch.Tensor | None, i: int) -> torch.Tensor:
        """Send an input gradient back; receive micro-batch i's input activation."""
        if self.prev is None:
            return self.mbs[i].inputs
        x = self._activation(i)
        _exchange([(dx, self.prev)], [(x, self.prev)])
        return self._received(x)

    def forward(self, i: int, x: torch.Tensor) -> torch.Tensor | None:
        """Run micro-batch i; keep what backward needs; return the activation to send."""
        start = time.perf_counter()
        out = self.fn(x, self.mbs[i])
        self.busy_s += time.perf_counter() - start
        self.inputs[i], self.outputs[i] = x, out
        if self.next is None:
            if out.dim() != 0:
                raise ValueError(f"the last stage's forward must return a scalar loss, got {tuple(out.shape)}")
            self._loss = out.detach() if self._loss is None else self._loss + out.detach()
            return None
        self._check_activation(i, out)
        return out.detach()

    def _check_activation(self, i: int, out: torch.Tensor) -> None:
        want = (*self.mbs[i].inputs.shape, self.hidden)
        if tuple(out.shape) != want or out.dtype != self.dtype:
            raise ValueError(f"stage {self.ctx.pp_rank} produced {tuple(out.shape)} {out.dtype}, the next "
                             f"stage expects {want} {self.dtype}: cast the stage output to the pipeline dtype")

    def backward(self, i: int, grad: torch.Tensor | None) -> torch.Tensor | None:
        """Backward of micro-batch i from its output gradient (None: the loss); input grad."""
        out, x = self.outputs.pop(i), self.inputs.pop(i)
        start = time.perf_counter()
        torch.autograd.backward(out, grad_tensors=grad)
        self.busy_s += time.perf_counter() - start
        return x.grad if self.prev is not None else None

    def loss_value(self) -> float:
        return float(self._loss) if self._loss is not None else 0.0
