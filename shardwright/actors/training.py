"""TrainingController: the single controller of one training job (EnergonAI style).

It drives a gang of ShardWorkers, each holding one TrainerRank (shardwright.training): one
dispatch per optimizer step; inside, the ranks run the pipeline schedule with TP and DP
collectives worker to worker. Guarantees:
- checkpoints are written by every rank, crash-safely (shardwright.training.checkpoint); the
  controller saves every `checkpoint_every_steps`, at the end of the run, and when asked to
  stop for preemption (`checkpoint_and_stop`), each step at most once, keeping the last
  `keep_checkpoints`; a run started with `resume_from` continues bit-exactly from that
  checkpoint, or from the newest complete one beside it when that one is missing or corrupt
  (`progress()["checkpoint"]` names the one loaded);
- `progress()["state"]` is a JobState: PLACED until the gang is up, RUNNING, then SUCCEEDED,
  FAILED, PREEMPTED (stopped with a checkpoint) or CANCELLED (stopped without one);
- a worker failure ends the run as FAILED with a message naming the rank and node;
- metrics of every step (loss, grad norm, lr, tokens/s, MFU, bubble) go to `on_metrics`.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from pathlib import Path

from shardwright.actors.gang import GangConfig, GangError, WorkerGang
from shardwright.actors.group_member import GroupMember
from shardwright.config import JobState, ModelSource, ParallelLayout, TrainConfig, TrainingJob
from shardwright.training.trainer import TrainerRank

log = logging.getLogger(__name__)


class TrainingRank(GroupMember):
    """One rank of a training gang: GroupMember's rendezvous, then a TrainerRank."""

    def __init__(self, rank: int, layout: ParallelLayout, *, threads_per_worker: int | None = None,
                 train: dict) -> None:
        super().__init__(rank, layout, threads_per_worker=threads_per_worker)
        self.trainer = TrainerRank(TrainConfig.model_validate(train), layout)

    def setup(self, source: dict, resume_from: str | None) -> tuple[int, str | None]:
        """Build context, model, optimizer and data; load `resume_from`; (step, checkpoint loaded)."""
        # the gang's process groups (built once, in init_group) are the trainer's too
        self._phase("setup", self.trainer.start, ModelSource(**source), self.ctx.device, self.ctx)
        if not resume_from:
            return 0, None
        step = self._phase("load_checkpoint", self.trainer.load, resume_from)
        return step, str(self.trainer.checkpoint)

    def train_step(self) -> dict:
        return self.trainer.train_step()

    def save(self, root: str) -> str:
        return str(self.trainer.save(root))

    def shutdown(self) -> None:
        """The trainer's hooks and threads first, then the trainer (its model and context hold the
        process groups), then the world (GroupMember.shutdown)."""
        if self.trainer is not None:
            self.trainer.close()
            self.trainer = None
        super().shutdown()


class TrainingGang(WorkerGang):
    """A training job's gang: one TrainingRank per rank, no memory peers."""

    def __init__(self, config: GangConfig, train: dict) -> None:
        super().__init__(config, TrainingRank, {"train": train})

    def setup(self, source: dict, resume_from: str | None) -> tuple[int, str | None]:
        """Every rank builds its model, optimizer and data and loads `resume_from`; rank 0's
        (step, checkpoint loaded)."""
        return self._call(self.compute_ranks, "setup", source, resume_from)[0]

    def train_step(self) -> dict:
        """One optimizer step on every rank; rank 0's metrics."""
        return self._call(self.compute_ranks, "train_step")[0]

    def save(self, root: str) -> str:
        """Every rank writes its part of a checkpoint under `root`; its path."""
        return self._call(self.compute_ranks, "save", root)[0]


class TrainingController:
    """Runs one TrainingJob on a gang; thread-safe progress, stop and preemption."""

    def __init__(self, job: TrainingJob, *, checkpoint_dir: Path, bundle_nodes: tuple[str, ...] | None = None,
                 on_metrics: Callable[[dict], None] | None = None, collective_timeout_s: float = 120.0) -> None:
        self.job = job
        self.config = job.train
        self.checkpoint_dir = Path(checkpoint_dir)
        self.bundle_nodes = bundle_nodes
        self.on_metrics = on_metrics
        self.collective_timeout_s = collective_timeout_s
        self._gang: TrainingGang | None = None
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._save_on_stop = False
        self._saved_step: int | None = None  # the step of the last checkpoint saved or loaded
        self._lock = threading.Lock()
        self._state = {"state": JobState.PLACED, "step": 0, "steps": self.config.steps, "loss": None,
                       "first_loss": None, "error": None, "checkpoint": None, "metrics": None}

    # ---- lifecycle
    def start(self, resume_from: str | None = None) -> TrainingController:
        """Build the gang (placement, groups, model, optimizer, data, checkpoint) and train."""
        gang = TrainingGang(GangConfig(layout=self.job.layout, collective_timeout_s=self.collective_timeout_s,
                                       bundle_nodes=self.bundle_nodes), train=self.job.train.model_dump(mode="json"))
        try:
            gang.start()
            step, loaded = gang.setup(self.job.model.model_dump(mode="json"), resume_from)
        except Exception:
            gang.kill()
            raise
        self._gang = gang
        self._saved_step = step if loaded else None
        self._update(state=JobState.RUNNING, step=step, checkpoint=loaded)
        self._thread = threading.Thread(target=self._loop, name=f"train-{self.job.name}", daemon=True)
        self._thread.start()
        return self

    def progress(self) -> dict:
        with self._lock:
            return dict(self._state)

    def wait(self, timeout_s: float | None = None) -> dict:
        if self._thread is not None:
            self._thread.join(timeout_s)
        return self.progress()

    def checkpoint_and_stop(self, timeout_s: float = 300.0) -> str | None:
        """Finish the current step, checkpoint, release the gang; returns the checkpoint path."""
        self._save_on_stop = True
        self._stop.set()
        self.wait(timeout_s)
        return self.progress()["checkpoint"]

    def stop(self) -> None:
        """Stop without a checkpoint and release the gang."""
        self._stop.set()
        self.wait(60)
        self._release()

    # ---- the loop
    def _loop(self) -> None:
        try:
            self._train()
        except GangError as err:
            log.error("training %s failed: %s", self.job.name, err)
            self._update(state=JobState.FAILED, error=str(err))
        except Exception as err:  # anything else is a bug worth reporting in full
            log.exception("training %s failed", self.job.name)
            self._update(state=JobState.FAILED, error=f"{type(err).__name__}: {err}")
        finally:
            self._release()

    def _train(self) -> None:
        every = self.config.checkpoint_every_steps
        while self.progress()["step"] < self.config.steps and not self._stop.is_set():
            metrics = self._gang.train_step()
            first = self.progress()["first_loss"]
            self._update(step=int(metrics["step"]), loss=metrics["loss"], metrics=metrics,
                         first_loss=metrics["loss"] if first is None else first)
            if self.on_metrics is not None:
                self.on_metrics(metrics)
            if every and metrics["step"] % every == 0:
                self._save()
        if self._stop.is_set() and not self._save_on_stop:
            self._update(state=JobState.CANCELLED)
            return
        self._save()
        self._update(state=JobState.PREEMPTED if self._stop.is_set() else JobState.SUCCEEDED)

    def _save(self) -> None:
        """Checkpoint the current step, unless it was just saved (or loaded)."""
        step = self.progress()["step"]
        if step == self._saved_step:
            return
        path = self._gang.save(str(self.checkpoint_dir))
        self._saved_step = step
        self._update(checkpoint=path)

    def _update(self, **fields) -> None:
        with self._lock:
            self._state.update(fields)

    def _release(self) -> None:
        if self._gang is not None:
            self._gang.kill()
            self._gang = None

    def worker_nodes(self) -> list[str]:
        return [n["node_id"] for n in self._gang.nodes] if self._gang is not None else []
