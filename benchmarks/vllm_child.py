"""The vLLM side of `shardwright bench decode`, run with the vLLM virtual environment's python.

Standalone on purpose (the standard library and vllm only; nothing from shardwright): the vLLM
environment has its own torch and none of Shardwright's dependencies. benchmarks/vllm_baseline.py
starts it as `VENV/bin/python vllm_child.py` with one JSON object on stdin:

    {"model_dir": str, "dtype": "float32" | "bfloat16", "max_model_len": int,
     "max_num_batched_tokens": int,
     "decode": {"prompts": {"B": [[ids], ...]}, "steps": int} | null,
     "mixed": {"warmup": [[ids], ...], "prompts": [[ids], ...], "max_tokens": int} | null}

and it prints one JSON object, the only thing on its stdout (vLLM's own logging goes to stderr):

    {"decode": {"B": {"step_s": [..], "tokens": [first request's ids]}},
     "mixed": {"ttft_s": [..], "wall_s": float, "output_tokens": int},
     "load_s": float, "vllm_version": str}

Both workloads drive the engine step by step (LLMEngine.add_request / step), the clock read as
each step's outputs arrive, the way the engine side is measured:
- decode: the batch's B requests are added together (greedy, ignore_eos, `steps + 2` new tokens);
  `step_s` holds the time between successive decode steps after the first one (which ends the
  warm-up), one entry per step; every step advances all B requests by one token. Each batch size
  first runs once unmeasured (2 tokens) so no first-call work lands in the figures.
- mixed: the `warmup` prompts run first, unmeasured; then every prompt of `prompts` is added at
  once at t0; `ttft_s[i]` = when request i's first token arrived - t0; `wall_s` = when the last
  request finished - t0. The warm-up prompts differ from the measured ones, so vLLM's prefix cache
  (on by default) cannot serve the measured prefills.
Token ids go in as prompt_token_ids with skip_tokenizer_init=True: the bench checkpoint has no
tokenizer and none is needed.
"""

from __future__ import annotations

import json
import os
import sys
import time


def _engine(request: dict):
    from vllm import LLM

    llm = LLM(model=request["model_dir"], dtype=request["dtype"], skip_tokenizer_init=True,
              max_model_len=request["max_model_len"],
              max_num_batched_tokens=request["max_num_batched_tokens"], seed=0)
    return llm.llm_engine


def _params(max_tokens: int):
    from vllm import SamplingParams
    from vllm.sampling_params import RequestOutputKind

    return SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True, detokenize=False,
                          output_kind=RequestOutputKind.DELTA)


def _run(engine, prompts: list[list[int]], max_tokens: int, tag: str):
    """Add every prompt at once, step to the end. Returns (t0, per-step [(time, {index: new
    tokens})]) with times from time.perf_counter()."""
    params = _params(max_tokens)
    t0 = time.perf_counter()
    for i, ids in enumerate(prompts):
        engine.add_request(f"{tag}-{i}", {"prompt_token_ids": ids}, params)
    steps = []
    while engine.has_unfinished_requests():
        outputs = engine.step()
        now = time.perf_counter()
        got = {int(o.request_id.rsplit("-", 1)[1]): list(o.outputs[0].token_ids) for o in outputs
               if o.outputs and o.outputs[0].token_ids}
        if got:
            steps.append((now, got))
    return t0, steps


def decode(engine, prompts: dict[str, list[list[int]]], steps: int) -> dict:
    out = {}
    for batch, batch_prompts in prompts.items():
        _run(engine, batch_prompts, 2, f"warm{batch}")
        _, log = _run(engine, batch_prompts, steps + 2, f"b{batch}")
        full = [t for t, got in log if len(got) == len(batch_prompts)]  # steps that advanced them all
        tokens = [tok for _, got in log for tok in got.get(0, [])]
        # full[0] is the prefill's first token, full[1] the first decode step (the warm-up)
        out[batch] = {"step_s": [b - a for a, b in zip(full[1:], full[2:])], "tokens": tokens}
    return out


def mixed(engine, warmup: list[list[int]], prompts: list[list[int]], max_tokens: int) -> dict:
    _run(engine, warmup, max_tokens, "mixwarm")
    t0, log = _run(engine, prompts, max_tokens, "mix")
    first: dict[int, float] = {}
    produced = 0
    for t, got in log:
        for i, toks in got.items():
            first.setdefault(i, t - t0)
            produced += len(toks)
    return {"ttft_s": [first[i] for i in range(len(prompts))], "wall_s": log[-1][0] - t0,
            "output_tokens": produced}


def main() -> int:
    request = json.load(sys.stdin)
    result_fd = os.dup(1)
    os.dup2(2, 1)  # everything vLLM (and its engine processes) prints goes to stderr
    import vllm

    start = time.perf_counter()
    engine = _engine(request)
    result = {"load_s": time.perf_counter() - start, "vllm_version": vllm.__version__}
    if request.get("decode"):
        result["decode"] = decode(engine, request["decode"]["prompts"], request["decode"]["steps"])
    if request.get("mixed"):
        m = request["mixed"]
        result["mixed"] = mixed(engine, m["warmup"], m["prompts"], m["max_tokens"])
    with os.fdopen(result_fd, "w") as out:
        out.write(json.dumps(result) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
