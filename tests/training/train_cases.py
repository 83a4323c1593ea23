"""Rank functions for the training tests (module level, so `spawn` can import them).

`layout_main` runs, on every rank of one gloo world, everything the tests check at that layout
for each model: 20 steps of 1F1B with checkpoints at steps 10 and 20, a fresh trainer resumed from
step 10 for steps 11-20, and optionally GPipe against 1F1B, a resume from a checkpoint of another
layout, and the trained model's logits on a fixed prompt. One launch per layout keeps the suite
fast (a launch costs several seconds here). `layout_main(0, 1, ...)` in the test process, without
torch.distributed, is the single-process reference.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from shardwright.config import ModelSource, ParallelLayout
from shardwright.training.data import DataConfig
from shardwright.training.optim import OptimConfig
from shardwright.training.trainer import TrainConfig, TrainerRank

# vocab 259: byte tokens fit, and tp = 2 pads the vocabulary to 260 (padding rows exercised).
MODEL_SHAPES = {
    "llama": dict(architecture="llama", vocab_size=259, num_kv_heads=2),  # GQA, kv heads split at tp=2
    "gpt2": dict(architecture="gpt2", vocab_size=259),  # tied embeddings: an LM-head copy at pp=2
}
LAYOUTS = {"tp2": ParallelLayout(tp=2), "pp2": ParallelLayout(pp=2), "dp2": ParallelLayout(dp=2),
           "tp2pp2": ParallelLayout(tp=2, pp=2), "cp2": ParallelLayout(cp=2)}
CORPUS = Path(__file__).resolve().parents[2] / "examples" / "corpus"
STEPS, RESUME_AT = 20, 10
PROMPT = (torch.arange(24) * 37 % 250).unsqueeze(0)


def train_config(schedule: str = "1f1b", precision: str = "float32") -> TrainConfig:
    """m = 4 micro-batches of a global batch of 8 sequences of 32 bytes; clipping active (norms > 0.5)."""
    return TrainConfig(
        data=DataConfig(path=CORPUS, seq_len=32, global_batch_size=8, seed=3),
        optim=OptimConfig(lr=3e-3, warmup_steps=2, decay_steps=STEPS, max_grad_norm=0.5),
        steps=STEPS, num_micro_batches=4, schedule=schedule, precision=precision)


def trainer(layout: ParallelLayout, model_dir: str, **config) -> TrainerRank:
    return TrainerRank(train_config(**config), layout).start(ModelSource(path=model_dir), device="cpu")


def run_steps(t: TrainerRank, steps: int, save_root: Path | None = None, save_at: tuple = ()) -> list[dict]:
    metrics = []
    for _ in range(steps):
        metrics.append(t.train_step())
        if save_root is not None and t.step in save_at:
            t.save(save_root)
    return metrics


def resumed_losses(layout: ParallelLayout, model_dir: str, checkpoint: str | Path) -> list[float]:
    """A fresh trainer loaded from `checkpoint`, run to step 20: the losses of its steps."""
    t = trainer(layout, model_dir)
    start = t.load(checkpoint)
    return [m["loss"] for m in run_steps(t, STEPS - start)]


@torch.no_grad()
def prompt_logits(t: TrainerRank) -> torch.Tensor:
    """Full logits [24, vocab] of the trained model on PROMPT (pp = 1 only)."""
    positions = torch.arange(PROMPT.shape[1]).unsqueeze(0)
    return t.model.full_logits(t.model(PROMPT, positions))[0]


def gpipe_vs_1f1b(layout: ParallelLayout, model_dir: str, steps: int = 3) -> dict:
    """The same steps under both schedules: losses, norms, largest parameter difference."""
    a, b = trainer(layout, model_dir, schedule="1f1b"), trainer(layout, model_dir, schedule="gpipe")
    ma, mb = run_steps(a, steps), run_steps(b, steps)
    pairs = zip(a.model.parameters(), b.model.parameters())
    diff = max(float((p.detach() - q.detach()).abs().max()) for p, q in pairs)
    return {"1f1b": ma, "gpipe": mb, "max_param_diff": diff}


def layout_main(rank: int, world_size: int, layout: ParallelLayout, models: dict[str, str], root: str,
                extras: dict | None = None) -> dict:
    extras = extras or {}
    out = {}
    for name, model_dir in models.items():
        ckpts = Path(root) / name
        t = trainer(layout, model_dir)
        result = {"metrics": run_steps(t, STEPS, ckpts, save_at=(RESUME_AT, STEPS))}
        if layout.pp == 1:
            result["logits"] = prompt_logits(t)
        result["resumed"] = resumed_losses(layout, model_dir, ckpts / "step-00000010")
        if extras.get("gpipe"):
            result["gpipe"] = gpipe_vs_1f1b(layout, model_dir)
        if name in extras.get("reshard_from", {}):
            result["resharded"] = resumed_losses(layout, model_dir, extras["reshard_from"][name])
        out[name] = result
    return out


def crash_main(rank: int, world_size: int, layout: ParallelLayout, model_dir: str, root: str) -> None:
    """Checkpoint step 2, then die (os._exit) in rank 1 after its first file of step 3."""
    import shardwright.training.checkpoint as ckpt

    t = trainer(layout, model_dir)
    run_steps(t, 2)
    t.save(root)
    run_steps(t, 1)
    if rank == 1:
        real = ckpt.atomic_write

        def write_then_die(path, write):
            real(path, write)
            os._exit(17)

        ckpt.atomic_write = write_then_die
    t.save(root)


def crash_at_main(rank: int, world_size: int, layout: ParallelLayout, model_dir: str, root: str,
                  target: str) -> None:
    """Checkpoint steps 1 and 2 (keep 2), then die (os._exit) in rank 0 right after the step-3 save
    renames something onto the name `target` (manifest.json, step-00000003, latest)."""
    import shardwright.training.checkpoint_root as fs

    t = trainer(layout, model_dir)
    t.config = t.config.model_copy(update={"keep_checkpoints": 2})
    run_steps(t, 2, Path(root), save_at=(1, 2))
    run_steps(t, 1)
    if rank == 0:
        real = fs.rename

        def rename_then_die(src, dst):
            real(src, dst)
            if Path(dst).name == target:
                os._exit(17)

        fs.rename = rename_then_die
    t.save(root)


def load_main(rank: int, world_size: int, layout: ParallelLayout, model_dir: str, root: str) -> tuple[int, str]:
    """(step, checkpoint loaded) of a fresh trainer at `layout` resumed from `root`."""
    t = trainer(layout, model_dir)
    return t.load(root), str(t.checkpoint)


def offload_main(rank: int, world_size: int, layout: ParallelLayout, model_dir: str, offload: float) -> list:
    """(loss, grad norm) of 5 steps with `offload` of the blocks' optimizer state on the host."""
    cfg = train_config().model_copy(update={"offload_optimizer": offload})
    t = TrainerRank(cfg, layout).start(ModelSource(path=model_dir), device="cpu")
    return [(m["loss"], m["grad_norm"]) for m in run_steps(t, 5)]


def native_threads() -> list[str]:
    """Names of this process's native threads (gloo names its own: gloo_tcp_loop, pt_gloo_runloop)."""
    names = []
    for task in Path("/proc/self/task").iterdir():
        try:
            names.append((task / "comm").read_text().strip())
        except OSError:  # the thread ended while we looked
            continue
    return names


def teardown_main(rank: int, world_size: int, layout: ParallelLayout, model_dir: str, out_dir: str,
                  launch: int, offload: float = 0.0) -> float:
    """One training step at `layout`, then leave: run_ranks tears the world down. At exit (after
    that teardown, before the interpreter shuts down) the native threads still alive are written to
    out_dir/threads-{launch}-{rank}.json for the test to read."""
    import atexit
    import json

    atexit.register(lambda: Path(out_dir, f"threads-{launch}-{rank}.json").write_text(json.dumps(native_threads())))
    t = TrainerRank(train_config().model_copy(update={"offload_optimizer": offload}), layout)
    t.start(ModelSource(path=model_dir), device="cpu")
    try:
        return t.train_step()["loss"]
    finally:
        t.close()
