"""`shardwright demo`: the main job, end to end, on the embedded defaults.

A local Ray cluster, embedded Redis in a temporary state directory and the gRPC server on a
free localhost port, all in this process. Through the gRPC client it then: submits a training
job (a small Llama, tensor parallel 2, on the bundled public-domain corpus), watches it to the
end, exports its checkpoint to a Hugging Face directory, deploys that directory for inference,
streams a generation, and shuts everything down. Exit status 0 only if every stage worked.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

from shardwright.config import JobState
from shardwright.scheduler.jobs import ENDED

# Package data (pyproject's package-data), so the demo runs from any folder on a wheel install;
# examples/corpus in a checkout is a link to it.
CORPUS = Path(__file__).resolve().parents[1] / "data" / "corpus"
TRAIN_STEPS = 40


def _say(text: str) -> None:
    print(f"[demo] {text}", flush=True)


def _training_job(corpus: Path, steps: int) -> str:
    return f"""kind: training
name: demo-train
model: {{preset: tiny-llama, seed: 0}}
layout: {{tp: 2}}
train:
  data: {{path: {corpus}, seq_len: 64, global_batch_size: 8}}
  optim: {{lr: 0.003, warmup_steps: 5, decay_steps: {steps}, min_lr: 0.0003}}
  steps: {steps}
  num_micro_batches: 2
"""


def _wait(client, job_id: str, states: set[str], timeout_s: float) -> dict:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        job = client.get(job_id)
        if job["state"] in states:
            return job
        time.sleep(0.5)
    raise TimeoutError(f"{job_id} is still {job['state']} after {timeout_s:.0f} s")


def _train(client, corpus: Path, steps: int) -> dict:
    job = client.submit(_training_job(corpus, steps), idempotency_key="demo-train")
    _say(f"submitted training job {job['job_id']} (tiny Llama, tp=2, {steps} steps)")
    losses = []
    for event in client.watch(job["job_id"], timeout_s=600):
        if "loss" in event.get("metrics", {}):
            losses.append(event["metrics"]["loss"])
            _say(f"  step {int(event['metrics'].get('step', 0))}: loss {event['metrics']['loss']:.3f}")
        elif event["state"] in (JobState.RUNNING, *ENDED):
            _say(f"  {event['state']}: {event.get('message', '')}")
    final = client.get(job["job_id"])
    if final["state"] != JobState.SUCCEEDED:
        raise RuntimeError(f"training ended {final['state']}: {final.get('message')}")
    return {**final, "losses": losses}


def bundled_corpus() -> Path:
    """The public-domain corpus shipped inside the package (shardwright/data/corpus)."""
    if not any(CORPUS.glob("*.txt")):
        raise FileNotFoundError(f"the bundled corpus {CORPUS} is missing: reinstall shardwright "
                                "(pip install --force-reinstall shardwright)")
    return CORPUS


def run_demo(workdir: Path, steps: int, port: int) -> dict:
    from shardwright.api.client import Client
    from shardwright.api.server import ServerOptions, ShardwrightServer
    from shardwright.cluster.ray_connect import connect
    from shardwright.config import Settings
    from shardwright.scheduler.service import SchedulerConfig, SchedulerService
    from shardwright.training.reshard import export_hf

    corpus = bundled_corpus()  # fail before starting anything
    settings = Settings(state_dir=workdir / "state")
    connect(settings, min_gpus=4)
    service = SchedulerService(settings, SchedulerConfig(policy="priority")).start()
    server = ShardwrightServer(service, ServerOptions(host="127.0.0.1", port=port, settings=settings))
    address = f"127.0.0.1:{server.start()}"
    _say(f"gRPC server on {address}; embedded Redis in {settings.state_dir}")
    try:
        with Client(address) as client:
            trained = _train(client, corpus, steps)
            model_dir = export_hf(trained["checkpoint"], workdir / "model")
            _say(f"exported {trained['checkpoint']} to {model_dir}")
            deployment = client.submit(f"kind: inference\nname: demo-chat\nmodel: {model_dir}\nlayout: {{tp: 2}}\n")
            _wait(client, deployment["job_id"], {JobState.RUNNING}, 180)
            _say(f"deployment {deployment['job_id']} is serving (tp=2)")
            prompt = "Four score and seven"
            pieces = list(client.generate_stream("demo-chat", prompt, max_tokens=48, ignore_eos=True,
                                                 temperature=0.8, top_k=40, seed=1234))
            text = "".join(m.get("text", "") for m in pieces)
            _say(f"generated: {prompt!r} -> {text!r}")
            client.cancel(deployment["job_id"])
            return {"status": "ok", "address": address, "train_job": trained["job_id"],
                    "first_loss": trained["losses"][0] if trained["losses"] else None,
                    "last_loss": trained["losses"][-1] if trained["losses"] else None,
                    "model_dir": str(model_dir), "prompt": prompt, "text": text,
                    "tokens": sum(1 for m in pieces if m.get("token_id", -1) >= 0)}
    finally:
        server.stop()
        service.close()
        _say("shut down")


def _next_steps(model_dir: str | None) -> str:
    serve = "shardwright serve --http-port 8000   # gRPC on 127.0.0.1:50051, OpenAI API on :8000"
    deploy = (f"a deployment of {model_dir}: 'kind: inference', 'name: chat', 'model: {model_dir}' "
              "(see examples/deployment.yaml), then shardwright submit FILE" if model_dir else
              "keep the trained model with --keep DIR and deploy it (see examples/deployment.yaml)")
    return ("what to try next:\n"
            f"  {serve}\n"
            f"  {deploy}\n"
            "  shardwright generate --deployment chat --prompt 'Four score'\n"
            "  shardwright run examples/train_tiny.yaml   # train on your own data (see the README)")


def cmd_demo(args: argparse.Namespace) -> int:
    if args.keep is not None and args.keep.exists() and (not args.keep.is_dir() or any(args.keep.iterdir())):
        raise ValueError(f"--keep {args.keep}: it exists and is not an empty folder; choose another")
    with tempfile.TemporaryDirectory(prefix="shardwright-demo-") as tmp:
        result = run_demo(Path(tmp), args.steps, args.port)
        if args.keep is not None:
            args.keep.parent.mkdir(parents=True, exist_ok=True)
            shutil.copytree(result["model_dir"], args.keep, dirs_exist_ok=True)
            result["model_dir"] = str(args.keep.resolve())
        else:
            result["model_dir"] = None  # it lived in the temporary folder, now removed
    if args.json:
        print(json.dumps(result))
    else:
        _say(f"done: loss {result['first_loss']:.3f} -> {result['last_loss']:.3f}, {result['tokens']} tokens served"
             + (f"; the trained model is in {result['model_dir']}" if result["model_dir"] else ""))
        print(_next_steps(result["model_dir"]))
    return 0


def add_demo_command(sub) -> None:
    p = sub.add_parser("demo", help="train, serve and query a small model end to end on this machine",
                       description=__doc__)
    p.add_argument("--steps", type=int, default=TRAIN_STEPS, help=f"training steps (default {TRAIN_STEPS})")
    p.add_argument("--port", type=int, default=0, help="gRPC port (default: a free one)")
    p.add_argument("--keep", type=Path, metavar="DIR",
                   help="keep the trained model (a Hugging Face directory) in DIR; by default it is removed")
    p.add_argument("--json", action="store_true", help="print one JSON object last")
    p.set_defaults(func=cmd_demo)

