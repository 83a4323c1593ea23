"""What users would otherwise run: Hugging Face `generate` on the same checkpoint, same machine.

Greedy decoding with `transformers` (fp32 or bf16, the process's default intra-op threads: every core)
in a fresh process. The decode rate excludes the prefill, as the engine's does: each batch is
generated twice, with 1 and with 1 + `steps` new tokens, and the rate is batch * steps / (the
difference of the two times). Both include the same prefill, so it cancels.
"""

from __future__ import annotations

import multiprocessing
import time
from concurrent.futures import ProcessPoolExecutor


def _rates(directory: str, batches: list[int], steps: int, prompt_len: int, dtype: str) -> dict[int, float]:
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(directory, dtype=getattr(torch, dtype)).eval()
    out = {}
    with torch.inference_mode():
        for b in batches:
            ids = torch.tensor([[(7 * i + j) % 1000 + 1 for j in range(prompt_len)] for i in range(b)])
            kwargs = {"attention_mask": torch.ones_like(ids), "do_sample": False, "pad_token_id": 0}

            def generate(n: int, ids=ids, kwargs=kwargs) -> float:
                start = time.perf_counter()
                model.generate(ids, max_new_tokens=n, min_new_tokens=n, **kwargs)
                return time.perf_counter() - start

            generate(2)  # warm-up
            prefill = generate(1)
            out[b] = b * steps / (generate(1 + steps) - prefill)
    return out


def hf_decode_rates(directory: str, batches: list[int], steps: int, prompt_len: int,
                    dtype: str = "float32") -> dict[int, float]:
    """Tokens/s of steady greedy decoding with Hugging Face generate, per batch size, in `dtype`."""
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(_rates, directory, batches, steps, prompt_len, dtype).result()
