"""`shardwright run JOB.yaml`: run one training job to completion on the Ray cluster in
RAY_ADDRESS (set by `ray job submit`) or on a local one, with a progress line per step on stderr
(loss, tokens/s, ETA) and, with --json, one JSON object last: status, steps, first_loss,
last_loss, checkpoint. Relative model and data paths in the job file resolve against the job
file's folder, and must exist, before anything starts."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path


def _progress_printer(total: int, start: float):
    def show(metrics: dict) -> None:
        step = int(metrics["step"])
        elapsed = time.monotonic() - start
        eta = elapsed / max(step, 1) * (total - step)
        width = 24
        done = int(width * step / total)
        print(f"\r[{'#' * done}{'.' * (width - done)}] step {step}/{total} loss {metrics['loss']:.4f} "
              f"{metrics['tokens_per_s']:.0f} tok/s mfu {metrics['mfu'] * 100:.1f}% ETA {eta:.0f}s",
              end="\n" if step == total or not sys.stderr.isatty() else "", file=sys.stderr, flush=True)
    return show


def cmd_run(args: argparse.Namespace) -> int:
    from shardwright.actors.training import TrainingController
    from shardwright.cluster.ray_connect import connect
    from shardwright.config import JobState, Settings, TrainingJob, parse_job
    from shardwright.tenants import confine_paths

    job_file = Path(args.job_file)
    job = parse_job(job_file.read_text())
    if not isinstance(job, TrainingJob):
        raise ValueError(f"{args.job_file} is an inference deployment; serve it with `shardwright serve` "
                         "and `shardwright submit`")
    job = confine_paths(job, base=job_file.resolve().parent)  # relative paths: against the job file's folder
    settings = Settings.from_env()
    checkpoint_dir = Path(args.checkpoint_dir or settings.state_dir / "runs" / job.name)
    start = time.monotonic()
    controller = TrainingController(job, checkpoint_dir=checkpoint_dir)  # validates train: before Ray
    connect(settings, min_gpus=job.layout.world_size)
    controller.on_metrics = _progress_printer(controller.config.steps, start)
    controller.start(resume_from=args.resume_from)
    final = controller.wait()
    result = {"status": str(final["state"]), "steps": final["step"], "first_loss": final["first_loss"],
              "last_loss": final["loss"], "checkpoint": final["checkpoint"], "error": final["error"],
              "elapsed_s": round(time.monotonic() - start, 1)}
    if args.json:
        print(json.dumps(result))
    else:
        print(f"{job.name}: {result['status']} after {result['steps']} steps, loss {result['first_loss']} -> "
              f"{result['last_loss']}; checkpoint {result['checkpoint']}")
    return 0 if final["state"] == JobState.SUCCEEDED else 1


def add_run_command(sub) -> None:
    p = sub.add_parser("run", help="run a training job file to completion (the Ray job entrypoint)",
                       description=__doc__)
    p.add_argument("job_file", help="YAML job file with kind: training")
    p.add_argument("--checkpoint-dir", help="where checkpoints go (default STATE_DIR/runs/NAME)")
    p.add_argument("--resume-from", help="a checkpoint directory (or a root: its latest) to continue from")
    p.add_argument("--json", action="store_true", help="print one JSON object last")
    p.set_defaults(func=cmd_run)
