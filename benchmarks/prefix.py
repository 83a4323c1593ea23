"""Time to first token with a shared 1,000-token prefix, prefix caching on vs off.

Run: `shardwright bench prefix [--quick] [--json]` from a source checkout.

On the ~110M-parameter Llama of `bench decode` (fp32, random weights, engine defaults: block 16,
512 tokens per step), one request at a time, each prompt a 1,000-token document then 24 tokens
of its own, one new token (so the time is the prefill's):
- `hit_ttft_s`: prefix caching on, the document already cached by the request before it (the
  request computes its 24 tokens plus the document's last partial block);
- `miss_ttft_s`: prefix caching on, a document not seen before (the request that caches it);
- `off_ttft_s`: the same prompts as `hit` on an engine with `prefix_caching=False` (the baseline);
- `floor_ttft_s`: the 24 own tokens alone on that engine (no prefix at all: what a hit can at
  best approach; the difference is attention over the 1,000 cached keys and the partial block).
Each figure is the median over the documents (3 with --quick, 7 without), after one unmeasured
warm-up pair per engine; both engines are up in the same run and take turns, one request at
a time (document by document: off, miss, hit). Ratios:
`ratio` = hit / off (the figure of issue 18: <= 0.3), `ratio_vs_miss` = hit / miss.
"""

from __future__ import annotations

import random
import statistics
import time

from benchmarks.runner import measure_point

COLUMNS = ["prefix_tokens", "own_tokens", "hit_ttft_s", "miss_ttft_s", "off_ttft_s", "floor_ttft_s", "ratio", "ratio_vs_miss",
           "prefill_tokens_saved"]
PREFIX_LEN = 1000
OWN_LEN = 24


def documents(count: int, vocab: int) -> list[tuple[list[int], list[int], list[int]]]:
    """(document, own tokens of the miss, own tokens of the hit) per measured document."""
    rng = random.Random(18)
    draw = lambda n: [rng.randrange(1, vocab) for _ in range(n)]  # noqa: E731
    return [(draw(PREFIX_LEN), draw(OWN_LEN), draw(OWN_LEN)) for _ in range(count)]


def ttft(eng, prompt: list[int]) -> float:
    """Seconds from submit to the first token of one request (nothing else running)."""
    from shardwright.serving.sampling import SamplingParams

    start = time.perf_counter()
    stream = eng.submit(prompt, SamplingParams(max_tokens=1, ignore_eos=True))
    if stream.next_event(timeout_s=600) is None:
        raise RuntimeError("the request finished without a token")
    elapsed = time.perf_counter() - start
    stream.result(timeout_s=600)
    return elapsed


def measure(directory, docs) -> dict:
    """Both engines up at once, idle but for one request at a time; per document, alternating:
    the hit prompt on the engine with caching off, then the miss and the hit with it on (so a
    burst of other load on the shared machine falls on both sides alike)."""
    from contextlib import ExitStack

    from shardwright.actors.engine import EngineConfig, InferenceEngine

    with ExitStack() as stack:
        off, on = (stack.enter_context(InferenceEngine(EngineConfig(
            model_dir=directory, num_blocks=256, prefix_caching=caching)).start()) for caching in (False, True))
        warm_doc, warm_a, warm_b = docs[0]
        for eng in (off, on):  # warm-up (a document never measured): a miss then a hit
            ttft(eng, warm_doc[::-1] + warm_a)
            ttft(eng, warm_doc[::-1] + warm_b)
        before = on.health(probe=False)["prefix_cache"]["prefill_tokens_saved"]
        out = {"off": [], "miss": [], "hit": [], "floor": []}
        for doc, own_miss, own_hit in docs:
            out["floor"].append(ttft(off, own_hit))
            out["off"].append(ttft(off, doc + own_hit))
            out["miss"].append(ttft(on, doc + own_miss))
            out["hit"].append(ttft(on, doc + own_hit))
        out["saved"] = on.health(probe=False)["prefix_cache"]["prefill_tokens_saved"] - before
        if off.health(probe=False)["prefix_cache"]["prefill_tokens_saved"]:
            raise RuntimeError("the engine with prefix_caching=False saved prefill tokens")
    return out


def run(quick: bool) -> dict:
    import ray

    from benchmarks.decode import model_dir
    from shardwright.config import ModelSpec

    directory = model_dir()
    spec = ModelSpec.from_hf_dir(directory)
    docs = documents(3 if quick else 7, spec.vocab_size)
    if not ray.is_initialized():
        ray.init(address="local", num_gpus=4, include_dashboard=False, log_to_driver=False, configure_logging=False)
    got = measure_point({"prefix_tokens": PREFIX_LEN}, measure, directory, docs)
    results = []
    if got is not None:
        hit, miss, base, floor = (statistics.median(got[k]) for k in ("hit", "miss", "off", "floor"))
        results.append({"prefix_tokens": PREFIX_LEN, "own_tokens": OWN_LEN, "hit_ttft_s": hit,
                        "miss_ttft_s": miss, "off_ttft_s": base, "floor_ttft_s": floor, "ratio": hit / base,
                        "ratio_vs_miss": hit / miss, "prefill_tokens_saved": got["saved"],
                        "hit_ttft_all_s": got["hit"], "miss_ttft_all_s": got["miss"], "off_ttft_all_s": got["off"]})
    notes = [f"model: {spec.num_parameters / 1e6:.0f}M parameters fp32, tp=pp=cp=1; {len(docs)} documents of "
             f"{PREFIX_LEN} tokens + {OWN_LEN} own tokens, one request at a time, engines alternating, 1 new token; medians; "
             "ratio = hit / off (prefix caching off: the baseline), ratio_vs_miss = hit / first sight"]
    return {"results": results, "notes": notes, "model_parameters": spec.num_parameters}


if __name__ == "__main__":
    import sys

    from benchmarks.runner import main

    sys.exit(main("prefix", "--quick" in sys.argv, "--json" in sys.argv))
