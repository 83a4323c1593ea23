"""The cost of the gRPC path: streamed generation and job submission, beside in-process calls.

Run: `shardwright bench api [--quick] [--json]` from a source checkout.

One process starts a local Ray cluster, the live scheduler (embedded Redis in a temporary state
directory) and the gRPC server on a free localhost port, and deploys a tiny Llama (tp = 1).
- generate_stream: N requests of 16 greedy tokens, one at a time, through
  InferenceService.GenerateStream (client -> server -> the deployment's controller actor) and
  through the OpenAI-compatible HTTP API of the same server (`POST /v1/completions`, stream=true,
  server-sent events read with httpx) beside the same requests submitted to the same controller
  actor from this process (its DeploymentClient, a Ray streaming generator); time to first token and
  total latency of each path, and its ratio to the in-process one. The paths take turns request by
  request, so load that comes and goes hits them alike.
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


PATHS = ("grpc", "http", "in-process")


def _stream_once(client, engine, http, path: str) -> tuple[float, float]:
    """(seconds to the first token, seconds to the last) of one 16-token greedy stream over `path`."""
    from shardwright.serving.sampling import SamplingParams

    start = time.perf_counter()
    first = None
    if path == "grpc":
        for msg in client.generate_stream("bench", PROMPT, max_tokens=16, ignore_eos=True):
            if first is None and msg.get("token_id", -1) >= 0:
                first = time.perf_counter()
    elif path == "http":
        body = {"model": "bench", "prompt": PROMPT, "max_tokens": 16, "ignore_eos": True, "stream": True}
        with http.stream("POST", "/v1/completions", json=body) as response:
            response.raise_for_status()
            for line in response.iter_lines():
                if first is None and line.startswith("data: {"):
                    first = time.perf_counter()
    else:
        for _ in engine.submit(PROMPT, SamplingParams(max_tokens=16, ignore_eos=True)):
            if first is None:
                first = time.perf_counter()
    return first - start, time.perf_counter() - start


def _stream_figures(client, engine, http, n: int) -> list[dict]:
    runs: dict[str, list[tuple[float, float]]] = {p: [] for p in PATHS}
    for _ in range(n):  # in turns: a load that comes and goes hits every path alike
        for path in PATHS:
            runs[path].append(_stream_once(client, engine, http, path))
    first = {p: statistics.median(r[0] for r in runs[p]) for p in PATHS}
    total = {p: statistics.median(r[1] for r in runs[p]) for p in PATHS}
    rows = []
    for path in ("grpc", "http"):
        rows += [{"path": f"generate_stream {path}", "what": "time to first token", "value": first[path],
                  "baseline": first["in-process"], "ratio": first[path] / first["in-process"], "unit": "s"},
                 {"path": f"generate_stream {path}", "what": "16 tokens", "value": total[path],
                  "baseline": total["in-process"], "ratio": total[path] / total["in-process"], "unit": "s"}]
    return rows


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
    import httpx

    from benchmarks.runner import measure_point
    from shardwright.api.client import Client
    from shardwright.api.http import start_http
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
        http_server = start_http(server, 0)
        try:
            with Client(address) as client, httpx.Client(base_url=f"http://127.0.0.1:{http_server.port}",
                                                         timeout=120) as http:
                job = client.submit(f"kind: inference\nname: bench\nmodel: {model}\n")
                while client.get(job["job_id"])["state"] != "running":
                    time.sleep(0.2)
                engine = service.engine("default", "bench")
                for path in PATHS:  # warm every path
                    _stream_once(client, engine, http, path)
                stream = measure_point({"path": "generate_stream", "requests": n}, _stream_figures, client, engine,
                                       http, n)
                submit = measure_point({"path": "submit", "jobs": m}, _submit_figures, client, service, m)
                results = (stream or []) + (submit or [])
        finally:
            http_server.stop()
            server.stop()
            service.close()
    notes = [f"tiny-llama (0.8M parameters), tp=1, prompt of {len(PROMPT)} tokens, medians of {n} requests; "
             f"{m} submissions per path"]
    return {"results": results, "notes": notes}
