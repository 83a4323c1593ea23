"""Presence, frequency and repetition penalties: `apply_penalties` against a plain per-token
reference written from the definitions (vLLM's and the OpenAI API's), and the sampler's argmax
after penalties. Exact in float64: the same operations on the same numbers."""

from __future__ import annotations

import random

import pytest
import torch
from pydantic import ValidationError

from shardwright.serving.sampling import SamplingParams, apply_penalties, sample_tokens


def reference_penalties(logits: list[float], history: list[int], num_generated: int, presence: float,
                        frequency: float, repetition: float) -> list[float]:
    out = list(logits)
    for token in set(history):  # repetition: over prompt and generated tokens (CTRL)
        out[token] = out[token] / repetition if out[token] > 0 else out[token] * repetition
    generated = history[len(history) - num_generated:] if num_generated else []
    for token in set(generated):  # frequency and presence: over generated tokens only
        out[token] -= frequency * generated.count(token) + presence
    return out


@pytest.mark.parametrize("seed", range(20))
def test_apply_penalties_equals_the_reference(seed):
    rng = random.Random(seed)
    vocab = rng.choice([7, 50, 300])
    logits = [rng.uniform(-5, 5) for _ in range(vocab)]
    history = [rng.randrange(vocab) for _ in range(rng.randrange(0, 40))]
    generated = rng.randrange(0, len(history) + 1)
    p = SamplingParams(presence_penalty=rng.uniform(-2, 2), frequency_penalty=rng.uniform(-2, 2),
                       repetition_penalty=rng.choice([1.0, rng.uniform(0.5, 3)]))
    ours = apply_penalties(torch.tensor(logits, dtype=torch.float64), history, generated, p)
    expected = reference_penalties(logits, history, generated, p.presence_penalty, p.frequency_penalty,
                                   p.repetition_penalty)
    assert torch.allclose(ours, torch.tensor(expected, dtype=torch.float64), rtol=0, atol=1e-12)


def test_greedy_with_penalties_is_the_argmax_of_the_penalised_logits():
    logits = torch.tensor([[3.0, 2.75, 0.0, -1.0], [1.0, 0.5, 0.875, 0.0]])  # exact in binary
    histories = [[0, 0, 1], [3, 2]]
    params = [SamplingParams(frequency_penalty=0.25), SamplingParams(repetition_penalty=2.0)]
    # steps 3 and 0: row 0's three tokens were all generated (3 - 2 * 0.25 = 2.75 - 0.25: a tie,
    # the lowest id wins); row 1 generated none, repetition covers its prompt (0.875 / 2 < 1)
    out = sample_tokens(logits, params, [1, 2], [3, 0], histories)
    penalised = [apply_penalties(logits[i].double(), histories[i], s, params[i]) for i, s in enumerate([3, 0])]
    assert out == [int(torch.argmax(r)) for r in penalised] == [0, 0]
    assert sample_tokens(logits, [SamplingParams(frequency_penalty=0.5), params[1]], [1, 2], [3, 0], histories) == [1, 0]


def test_penalised_rows_need_histories_and_bad_values_are_refused():
    with pytest.raises(ValueError, match="histories"):
        sample_tokens(torch.zeros(1, 4), [SamplingParams(presence_penalty=1.0)], [0], [0])
    for bad in ({"presence_penalty": 2.5}, {"frequency_penalty": -3}, {"repetition_penalty": 0}):
        with pytest.raises(ValidationError):
            SamplingParams(**bad)
