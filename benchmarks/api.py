"""The cost of the gRPC path: streamed generation and job submission, beside in-process calls.

Run: `shardwright bench api [--quick] [--json]` from a source checkout.

One process starts a local Ray cluster, the live scheduler (embedded Redis in a temporary state
directory) and the gRPC server on a free localhost port, and deploys a tiny Llama (tp = 1).
- generate_stream: N requests of 16 greedy tokens, one at a time, through
  InferenceService.GenerateStream (client -> server -> the deployment's controller actor) beside
  the same requests submitted to the same controller actor from this process (its DeploymentClient,
  a Ray streaming generator); time to first token and total latency, and the ratio.
- submit: M training jobs that cannot start (each asks for more GPUs than are free) submitted
  through JobService.SubmitJob beside the same submissions to the scheduler service in-process;
  both persist every job and its events in Redis before returning. Submissions per second.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path

COLUMNS = ["path", "what", "value", "baseline", "ratio", "unit"]
PROMPT = [1, 2, 3, 4, 5, 6, 7, 8]


def _stream_once(client, engine, via_grpc: bool) -> tuple[float, float]:
    from shardwright.serving.sampling import SamplingParams

    start = time.perf_counter()
    first = None
    if via_grpc:
        for msg in client.generate_stream("bench", PROMPT, max_tokens=16, ignore_eos=True):
            if first is None and msg.get("token_id", -1) >= 0:
                first = time.perf_counter()
    else:
        for _ in engine.submit(PROMPT, SamplingParams(max_tokens=16, ignore_eos=True)):
            if first is None:
                first = time.perf_counter()
    return first - start, time.perf_counter() - start


def _stream_figures(client, engine, n: int) -> list[dict]:
    rows = []
    for label, via in (("grpc", True), ("in-process", False)):
        runs = [_stream_once(client, engine, via) for _ in range(n)]
        rows.append((label, statistics.median(r[0] for r in runs), statistics.median(r[1] for r in runs)))
    (_, g_first, g_total), (_, p_first, p_total) = rows
    return [{"path": "generate_stream", "what": "time to first token", "value": g_first, "baseline": p_first,
             "ratio": g_first / p_first, "unit": "s"},
            {"path": "generate_stream", "what": "16 tokens", "value": g_total, "baseline": p_total,
             "ratio": g_total / p_total, "unit": "s"}]


def _job(i: int) -> str:
    """A job that is checked in full at submission (its corpus must exist) and then waits in the queue."""
    from shardwright.api.demo import bundled_corpus

    return (f"kind: training\nname: queued-{i}\nmodel: {{preset: tiny-llama}}\nlayout: {{tp: 4}}\n"
            f"train: {{data: {{path: {bundled_corpus()}, seq_len: 8, global_batch_size: 1}}, steps: 1, "
            "num_micro_batches: 1}\n")


def _submit_figures(client, service, m: int) -> list[dict]:
    from shardwright.config import parse_job

    start = time.perf_counter()
    ids = [client.submit(_job(i))["job_id"] for i in range(m)]
    grpc_rate = m / (time.perf_counter() - start)
    start = time.perf_counter()
    ids += [service.submit(parse_job(_job(m + i)), "default")["job_id"] for i in range(m)]
    local_rate = m / (time.perf_counter() - start)
    for job_id in ids:
        service.cancel(job_id, "default")
    return [{"path": "submit", "what": "jobs per second (Redis-persisted)", "value": grpc_rate,
             "baseline": local_rate, "ratio": grpc_rate / local_rate, "unit": "1/s"}]


def run(quick: bool) -> dict:
    from benchmarks.runner import measure_point
    from shardwright.api.client import Client
    from shardwright.api.server import ServerOptions, ShardwrightServer
    from shardwright.cluster.ray_connect import connect
    from shardwright.config import Settings
    from shardwright.models.presets import preset_spec
    from shardwright.models.random_init import write_random_checkpoint
    from shardwright.scheduler.service import SchedulerConfig, SchedulerService

    n, m = (10, 50) if quick else (40, 200)
    with tempfile.TemporaryDirectory(prefix="shardwright-bench-api-") as tmp:
        settings = Settings(state_dir=Path(tmp) / "state")
        model = write_random_checkpoint(Path(tmp) / "model", preset_spec("tiny-llama"), seed=0)
        connect(settings, min_gpus=4)
        service = SchedulerService(settings, SchedulerConfig()).start()
        server = ShardwrightServer(service, ServerOptions(port=0, settings=settings))
        address = f"127.0.0.1:{server.start()}"
        try:
            with Client(address) as client:
                job = client.submit(f"kind: inference\nname: bench\nmodel: {model}\n")
                while client.get(job["job_id"])["state"] != "running":
                    time.sleep(0.2)
                engine = service.engine("default", "bench")
                _stream_once(client, engine, True)  # warm both paths
                _stream_once(client, engine, False)
                stream = measure_point({"path": "generate_stream", "requests": n}, _stream_figures, client, engine, n)
                submit = measure_point({"path": "submit", "jobs": m}, _submit_figures, client, service, m)
                results = (stream or []) + (submit or [])
        finally:
            server.stop()
            service.close()
    notes = [f"tiny-llama (0.8M parameters), tp=1, prompt of {len(PROMPT)} tokens, medians of {n} requests; "
             f"{m} submissions per path"]
    return {"results": results, "notes": notes}
