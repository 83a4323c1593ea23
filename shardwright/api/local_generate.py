"""One-shot generation from a Hugging Face directory with tensor parallelism in local processes.

This is the interim path behind `shardwright generate --model DIR` until the Ray inference
engine lands: `tp` gloo (or NCCL) ranks are started with `run_ranks`, each loads its slice of the
checkpoint and runs greedy decoding; rank 0's tokens are returned.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from shardwright.config import ModelSpec, ParallelLayout
from shardwright.parallel.launch import run_ranks


@dataclass(frozen=True)
class GenerationResult:
    tokens: list[int]
    text: str
    prompt_tokens: int
    elapsed_s: float


def _rank_generate(rank: int, world_size: int, directory: str, prompt_ids: list[int], max_tokens: int,
                   stop_ids: list[int]) -> list[int]:
    from shardwright.models import load_model
    from shardwright.models.generate import greedy_generate
    from shardwright.parallel.context import ParallelContext

    layout = ParallelLayout(tp=world_size)
    ctx = ParallelContext.single() if world_size == 1 else ParallelContext.from_initialized(layout)
    _, model = load_model(directory, ctx)
    return greedy_generate(model, prompt_ids, max_tokens, stop_ids=stop_ids)


def generate_local(directory: str, prompt_ids: list[int], *, tp: int, max_tokens: int) -> list[int]:
    """Greedy continuation of `prompt_ids` by the checkpoint in `directory` at tensor parallel `tp`."""
    spec = ModelSpec.from_hf_dir(directory)
    ParallelLayout(tp=tp).validate_for(spec)
    bad = [i for i in prompt_ids if not 0 <= i < spec.vocab_size]
    if bad:
        raise ValueError(f"prompt ids {bad[:5]} are outside the vocabulary [0, {spec.vocab_size})")
    args = (str(directory), prompt_ids, max_tokens, spec.eos_token_id)
    if tp == 1:
        return _rank_generate(0, 1, *args)
    return run_ranks(_rank_generate, tp, args=args)[0]


def timed_generate(directory: str, prompt_ids: list[int], *, tp: int, max_tokens: int, tokenizer) -> GenerationResult:
    start = time.perf_counter()
    tokens = generate_local(directory, prompt_ids, tp=tp, max_tokens=max_tokens)
    return GenerationResult(tokens, tokenizer.decode(tokens), len(prompt_ids), time.perf_counter() - start)
