"""The per-job controller actors: each job's controller in a named, detached Ray actor of its own.

A deployment's InferenceEngine runs in a `DeploymentActor`, a training job's TrainingController in a
`TrainingActor`. Each is created detached (it outlives the process that created it: the scheduler,
the API server) and named `shardwright-job:<store id>:<job id>` in the Ray namespace `shardwright`, so
a scheduler that starts later finds it by name and adopts it. The actor owns its gang's workers and
placement group: killing the actor ends them (Ray fate-shares an actor's children and placement
groups with it), and nothing else does.

Both actors answer control calls (`progress`, `describe`, `stop`, ...) in their own concurrency group,
so a control call never waits behind a long generation. Generation streams: `generate` is a Ray
streaming generator whose first item is `("started", request id, prompt ids)` (or `("error", kind,
message)` for a request that can never run), then `("tokens", [(token id or None, text), ...], [logprob of each token, when asked])` in
batches of whatever is ready, then `("end", finish reason, error)`. `DeploymentClient` wraps this
into the same RequestStream an in-process engine returns, so callers cannot tell the difference.
"""

from __future__ import annotations

import functools
import logging
import os
import threading
from pathlib import Path
from typing import Any

import ray
from ray.exceptions import GetTimeoutError, RayActorError, RayTaskError
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from shardwright.config import JobState
from shardwright.serving.batching import TokenEvent
from shardwright.serving.requests import RequestStream
from shardwright.serving.sampling import SamplingParams

log = logging.getLogger(__name__)

RAY_NAMESPACE = "shardwright"
NAME_PREFIX = "shardwright-job"
CONTROL = "control"  # the concurrency group of control calls
MAX_STREAMS = 256  # concurrent generations one deployment actor streams


def controller_name(store_id: str, job_id: str) -> str:
    """The Ray actor name of a job's controller (unique per state store and job)."""
    return f"{NAME_PREFIX}:{store_id}:{job_id}"


def job_of(name: str, store_id: str) -> str | None:
    """The job id in a controller actor's name, if the name is one of `store_id`'s controllers."""
    prefix = f"{NAME_PREFIX}:{store_id}:"
    return name[len(prefix):] if name.startswith(prefix) else None


def find_controller(name: str):
    """The handle of a live controller actor named `name`, or None."""
    try:
        return ray.get_actor(name, namespace=RAY_NAMESPACE)
    except ValueError:
        return None


def controller_names(store_id: str) -> list[str]:
    """Names of the controller actors of `store_id` that Ray knows alive."""
    named = ray.util.list_named_actors(all_namespaces=True)
    return [a["name"] for a in named if a["namespace"] == RAY_NAMESPACE and job_of(a["name"], store_id)]


def create_controller(kind: str, name: str, near_node: str | None, *args):
    """Create the detached controller actor of a job (kind 'inference' or 'training'); it runs next
    to its rank 0 where Ray allows (the step channel is then a local socket)."""
    cls = DeploymentActor if kind == "inference" else TrainingActor
    options: dict[str, Any] = {"name": name, "namespace": RAY_NAMESPACE, "lifetime": "detached",
                               "num_cpus": 0, "max_restarts": 0, "max_concurrency": MAX_STREAMS}
    if near_node:
        options["scheduling_strategy"] = NodeAffinitySchedulingStrategy(near_node, soft=True)
    return cls.options(**options).remote(*args)


def cause_of(err: BaseException) -> str:
    """The message of what a controller actor raised, without Ray's traceback wrapping."""
    if isinstance(err, RayTaskError) and err.cause is not None:
        return f"{type(err.cause).__name__}: {err.cause}" if not str(err.cause) else str(err.cause)
    return str(err)


def _workers_of(gang) -> list[dict]:
    return [dict(n) for n in gang.nodes] if gang is not None else []


@ray.remote(concurrency_groups={CONTROL: 8})
class DeploymentActor:
    """Detached shell of one deployment's InferenceEngine."""

    def __init__(self, job_id: str, config: dict) -> None:
        from shardwright.actors.engine import EngineConfig, InferenceEngine
        from shardwright.training.reshard import ensure_served_model_dir

        self.job_id = job_id
        # a deployment of a training checkpoint: its export is written here, once (a step-N.hf folder)
        config = {**config, "model_dir": str(ensure_served_model_dir(config["model_dir"]))}
        self.engine = InferenceEngine(EngineConfig(**config))

    @ray.method(concurrency_group=CONTROL)
    def start(self, resume_from: str | None = None) -> int:
        self.engine.start()
        return self.engine.steps

    @ray.method(concurrency_group=CONTROL)
    def progress(self) -> dict:
        health = self.engine.health(probe=False)
        stats = {key: health[key] for key in ("running", "waiting", "blocks_in_use", "blocks_total", "steps")
                 if key in health}
        prefix = health.get("prefix_cache") or {}
        if prefix.get("enabled"):
            stats.update({f"prefix_{key}": prefix[key] for key in ("cached_blocks", "prefill_tokens_saved",
                                                                   "hit_sequences", "evictions")})
        return {"state": JobState.FAILED if health["failed"] else JobState.RUNNING, "step": int(health["steps"]),
                "error": health["failed"] or health["last_error"],
                "checkpoint": None, "loss": None, "healthy": bool(health["healthy"]), "stats": stats}

    @ray.method(concurrency_group=CONTROL)
    def health(self, probe: bool = True) -> dict:
        return self.engine.health(probe=probe)

    @ray.method(concurrency_group=CONTROL)
    def describe(self) -> dict:
        """The controller's process and its gang's workers (node, ip, pid per rank), its pooling plan."""
        plan = self.engine.pool_plan
        return {"job_id": self.job_id, "pid": os.getpid(), "workers": _workers_of(self.engine._gang),
                "model_dir": str(self.engine.config.model_dir), "memory_plan": plan.describe() if plan else [],
                "steps": self.engine.steps, "blocks_in_use": self.engine.blocks_in_use}

    @ray.method(concurrency_group=CONTROL)
    def memory(self) -> dict:
        return self.engine.memory()

    @ray.method(concurrency_group=CONTROL)
    def prompt_ids(self, prompt):
        return self.engine.prompt_ids(prompt)

    @ray.method(concurrency_group=CONTROL)
    def prompt_logits(self, prompt, timeout_s: float = 120.0):
        return self.engine.prompt_logits(prompt, timeout_s)

    @ray.method(concurrency_group=CONTROL)
    def cancel(self, request_id: str) -> None:
        self.engine.cancel(request_id)

    def generate(self, prompt, params: dict):
        """Stream one request (see the module docstring for the items)."""
        try:
            stream = self.engine.submit(prompt, SamplingParams(**params))
        except (ValueError, RuntimeError) as err:
            yield ("error", "ValueError" if isinstance(err, ValueError) else "RuntimeError", str(err))
            return
        yield ("started", stream.request_id, stream.output.prompt_ids)
        sent = 0  # tokens whose logprobs (when asked) went out
        while True:
            items, done = stream.take()
            if items:
                n = sum(1 for token, _ in items if token is not None)
                yield ("tokens", items, stream.output.logprobs[sent: sent + n])
                sent += n
            if done:
                yield ("end", stream.output.finish_reason, stream.error)
                return

    @ray.method(concurrency_group=CONTROL)
    def stop(self) -> None:
        self.engine.shutdown()


@ray.remote(concurrency_groups={CONTROL: 8})
class TrainingActor:
    """Detached shell of one training job's TrainingController."""

    def __init__(self, job_id: str, spec: dict, checkpoint_dir: str, bundle_nodes: tuple[str, ...] | None) -> None:
        from shardwright.actors.training import TrainingController
        from shardwright.config import TrainingJob

        self.job_id = job_id
        Path(checkpoint_dir).mkdir(parents=True, exist_ok=True)
        self.controller = TrainingController(TrainingJob(**spec), checkpoint_dir=Path(checkpoint_dir),
                                             bundle_nodes=bundle_nodes)

    @ray.method(concurrency_group=CONTROL)
    def start(self, resume_from: str | None = None) -> int:
        self.controller.start(resume_from=resume_from)
        return int(self.controller.progress()["step"])

    @ray.method(concurrency_group=CONTROL)
    def progress(self) -> dict:
        return self.controller.progress()

    @ray.method(concurrency_group=CONTROL)
    def describe(self) -> dict:
        return {"job_id": self.job_id, "pid": os.getpid(), "workers": _workers_of(self.controller._gang)}

    @ray.method(concurrency_group=CONTROL)
    def checkpoint_and_stop(self, timeout_s: float) -> str | None:
        return self.controller.checkpoint_and_stop(timeout_s)

    @ray.method(concurrency_group=CONTROL)
    def stop(self) -> None:
        self.controller.stop()


class DeploymentClient:
    """A running deployment as its callers see it, through its controller actor's handle.

    The same surface as an in-process InferenceEngine where the API uses it: `submit` returns a
    RequestStream fed by one pump thread per request; `cancel` frees the request's KV blocks in the
    controller before its next step. A controller that died fails the stream (RequestFailed) and
    makes `submit` raise RuntimeError (UNAVAILABLE at the API).
    """

    def __init__(self, job_id: str, actor, model_dir: str) -> None:
        self.job_id, self.actor = job_id, actor
        self.config = _ClientConfig(Path(model_dir))

    def submit(self, prompt, params: SamplingParams | None = None) -> RequestStream:
        params = params or SamplingParams()
        gen = self.actor.generate.remote(prompt, params.model_dump(mode="json"))
        try:
            first = ray.get(next(gen))
        except (RayActorError, StopIteration) as err:
            raise RuntimeError(f"the controller of deployment job {self.job_id} is gone ({type(err).__name__}); "
                               "it is being restarted or was stopped: retry shortly") from err
        if first[0] == "error":
            raise (ValueError if first[1] == "ValueError" else RuntimeError)(first[2])
        _, request_id, prompt_ids = first
        stream = RequestStream(request_id, prompt_ids, decode=lambda ids: "")
        threading.Thread(target=_pump, args=(gen, stream, self.job_id), name=f"shardwright-pump-{request_id}",
                         daemon=True).start()
        return stream

    def cancel(self, request_id: str) -> None:
        self.actor.cancel.remote(request_id)

    @functools.cached_property
    def tokenizer(self):
        """The deployment's tokenizer, loaded here (the API names tokens for logprobs with it)."""
        from shardwright.models.tokenizer import load_tokenizer

        return load_tokenizer(self.config.model_dir)

    def generate(self, prompts, params: SamplingParams | None = None, timeout_s: float | None = None):
        streams = [self.submit(p, params) for p in prompts]
        return [s.result(timeout_s) for s in streams]

    def prompt_ids(self, prompt) -> list[int]:
        return _call(self.actor.prompt_ids.remote(prompt))

    def prompt_logits(self, prompt, timeout_s: float = 120.0):
        return _call(self.actor.prompt_logits.remote(prompt, timeout_s), timeout_s + 30)

    def health(self, probe: bool = True) -> dict:
        return _call(self.actor.health.remote(probe))

    def memory(self) -> dict:
        return _call(self.actor.memory.remote())

    def describe(self) -> dict:
        return _call(self.actor.describe.remote())

    @property
    def steps(self) -> int:
        return int(self.describe()["steps"])

    @property
    def blocks_in_use(self) -> int:
        return int(self.describe()["blocks_in_use"])


class _ClientConfig:
    def __init__(self, model_dir: Path) -> None:
        self.model_dir = model_dir


def _call(ref, timeout_s: float = 60.0):
    try:
        return ray.get(ref, timeout=timeout_s)
    except RayTaskError as err:
        raise RuntimeError(cause_of(err)) from err
    except (RayActorError, GetTimeoutError) as err:
        raise RuntimeError(f"the deployment's controller did not answer: {type(err).__name__}") from err


def _pump(gen, stream: RequestStream, job_id: str) -> None:
    """Move a controller's stream items into the caller's RequestStream."""
    try:
        for ref in gen:
            item = ray.get(ref)
            if item[0] == "tokens":
                logprobs = iter(item[2])  # one per token when the request asked for logprobs, else none
                for token_id, text in item[1]:
                    logprob = next(logprobs, None) if token_id is not None else None
                    stream.push(TokenEvent(stream.request_id, token_id, text, logprob=logprob))
            elif item[0] == "end":
                _, reason, error = item
                if error is not None:
                    stream.fail(error)
                else:
                    stream.finish(reason)
                return
        stream.fail(f"the controller of deployment job {job_id} ended the stream early")
    except Exception as err:  # the controller died mid-stream
        stream.fail(f"the controller of deployment job {job_id} failed mid-request: {cause_of(err)}")
