"""SamplingParams validation, the seeded sampler's distributions and invariance, stop rules."""

from __future__ import annotations

import math

import pytest
import torch
from pydantic import ValidationError

from shardwright.serving.sampling import (
    SamplingParams,
    StopChecker,
    check_stop,
    sample_tokens,
    uniform,
)

VOCAB = ["a", "b", "E", "N", "D", " ", "x"]


def decode(ids: list[int]) -> str:
    return "".join(VOCAB[i] for i in ids)


# ----------------------------------------------------------------------------------- params
@pytest.mark.parametrize(
    ("field", "value", "fix"),
    [
        ("max_tokens", 0, "at least one new token"),
        ("temperature", -0.5, "use 0 for greedy"),
        ("temperature", float("nan"), "use 0 for greedy"),
        ("top_k", -1, "use 0 to turn top-k off"),
        ("top_p", 0.0, "use 1.0 to turn nucleus sampling off"),
        ("top_p", 1.5, "use 1.0 to turn nucleus sampling off"),
        ("seed", -1, "modulo 2\\*\\*64"),
        ("stop", ["ok", ""], "empty string"),
        ("stop_token_ids", [3, -2], "negative ids"),
    ],
)
def test_invalid_params_name_the_field_and_the_fix(field, value, fix):
    with pytest.raises(ValidationError, match=fix) as info:
        SamplingParams(**{field: value})
    assert info.value.errors()[0]["loc"] == (field,)


def test_params_reject_unknown_fields_and_are_immutable():
    with pytest.raises(ValidationError, match="Extra inputs"):
        SamplingParams(temprature=1.0)
    p = SamplingParams(temperature=0.5, stop=["\n"])
    with pytest.raises(ValidationError):
        p.temperature = 1.0
    assert SamplingParams().greedy and SamplingParams(temperature=2.0, top_k=1).greedy


# ---------------------------------------------------------------------------------- sampler
def test_greedy_takes_lowest_id_on_ties():
    logits = torch.tensor([[0.0, 3.0, 3.0, 1.0], [5.0, 5.0, 5.0, 5.0]])
    assert sample_tokens(logits, [SamplingParams()] * 2, [0, 0], [0, 0]) == [1, 0]


def test_top_k_1_equals_greedy_at_any_temperature():
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(16, 50, generator=gen)
    greedy = sample_tokens(logits, [SamplingParams()] * 16, [0] * 16, [0] * 16)
    params = [SamplingParams(temperature=t, top_k=1) for t in torch.linspace(0.1, 3, 16).tolist()]
    assert sample_tokens(logits, params, list(range(16)), list(range(16))) == greedy
    assert greedy == logits.argmax(-1).tolist()


def test_seeded_draw_ignores_batch_position_size_and_neighbours():
    gen = torch.Generator().manual_seed(1)
    row = torch.randn(300, generator=gen)
    params = SamplingParams(temperature=0.9, top_p=0.95, top_k=50)
    solo = [sample_tokens(row.unsqueeze(0), [params], [42], [s])[0] for s in range(20)]
    assert len(set(solo)) > 1  # different steps give different draws
    for batch, pos in [(2, 1), (7, 3), (33, 32), (33, 0)]:
        logits = torch.randn(batch, 300, generator=gen)
        logits[pos] = row
        others = [SamplingParams(temperature=1.3, top_k=5 * i) for i in range(batch)]
        mixed = others[:pos] + [params] + others[pos + 1 :]
        got = []
        for s in range(20):
            seeds, steps = list(range(100, 100 + batch)), [s + 7] * batch
            seeds[pos], steps[pos] = 42, s
            got.append(sample_tokens(logits, mixed, seeds, steps)[pos])
        assert got == solo, (batch, pos)


def test_uniform_is_a_fixed_function_of_seed_and_step():
    # Golden values: a change here breaks reproducibility of every seeded request ever served.
    assert uniform(0, 0) == pytest.approx(0.6524484863740322, abs=0)
    assert uniform(2**64 - 1, 12345) == pytest.approx(0.884002720749738, abs=0)
    us = [uniform(7, s) for s in range(20000)]
    assert min(us) >= 0.0 and max(us) < 1.0
    assert abs(sum(us) / len(us) - 0.5) < 0.01  # mean of U(0,1) over 20000: sd 0.002


def _frequencies(logits: torch.Tensor, params: SamplingParams, n: int) -> torch.Tensor:
    tokens = sample_tokens(logits.expand(n, -1), [params] * n, list(range(n)), [3] * n)
    return torch.bincount(torch.tensor(tokens), minlength=logits.shape[-1]).double() / n


# n = 6000 draws: a frequency's standard deviation is at most 0.5 / sqrt(6000) = 0.0065, so a
# tolerance of 0.03 is over 4.5 sigma for each token (the draws are a fixed hash, not flaky).
N, TOL = 6000, 0.03
PROBS = torch.tensor([0.40, 0.25, 0.15, 0.10, 0.06, 0.04], dtype=torch.float64)


def test_temperature_frequencies_match_softmax():
    logits = PROBS.log().float().unsqueeze(0)
    for t in (0.7, 1.0, 1.6):
        want = torch.softmax(PROBS.log() / t, dim=0)
        got = _frequencies(logits, SamplingParams(temperature=t), N)
        assert (got - want).abs().max() < TOL, (t, got, want)


def test_top_k_and_top_p_keep_the_right_tokens_with_renormalised_mass():
    logits = PROBS.log().float().unsqueeze(0)
    got = _frequencies(logits, SamplingParams(temperature=1.0, top_k=3), N)
    want = torch.zeros(6, dtype=torch.float64)
    want[:3] = PROBS[:3] / PROBS[:3].sum()
    assert got[3:].sum() == 0 and (got - want).abs().max() < TOL
    # top_p=0.7: mass before token 1 is 0.40 < 0.7 (kept), before token 2 it is 0.65 < 0.7
    # (kept), before token 3 it is 0.80 (dropped): the nucleus is {0, 1, 2}.
    got = _frequencies(logits, SamplingParams(temperature=1.0, top_p=0.7), N)
    assert got[3:].sum() == 0 and (got - want).abs().max() < TOL
    got = _frequencies(logits, SamplingParams(temperature=1.0, top_p=0.3), N)
    assert got[0] == 1.0


def test_tiny_temperature_and_masked_logits_stay_finite():
    logits = torch.tensor([[-math.inf, 1.0, 1.0 + 1e-3, -math.inf]])
    p = SamplingParams(temperature=1e-30)
    assert sample_tokens(logits, [p], [5], [0]) == [2]
    assert all(t in (1, 2) for t in sample_tokens(logits.expand(50, -1), [SamplingParams(temperature=5.0)] * 50,
                                                  list(range(50)), [0] * 50))


def test_sampler_rejects_bad_inputs_with_the_numbers():
    with pytest.raises(ValueError, match=r"rows \[1\]"):
        sample_tokens(torch.tensor([[0.0, 1.0], [math.nan, 1.0]]), [SamplingParams()] * 2, [0, 0], [0, 0])
    with pytest.raises(ValueError, match="2 rows but params/seeds/steps have 1/2/2"):
        sample_tokens(torch.zeros(2, 3), [SamplingParams()], [0, 0], [0, 0])
    with pytest.raises(ValueError, match=r"\[batch, vocab\]"):
        sample_tokens(torch.zeros(3), [SamplingParams()], [0], [0])


# ------------------------------------------------------------------------------- stop rules
def test_stop_string_truncates_text_even_across_tokens():
    p = SamplingParams(stop=["END"], max_tokens=50)
    d = check_stop([0, 1, 2, 3, 0, 2, 3, 4, 0], p, eos_ids=[], decode=decode)  # abENaEND|a
    assert (d.finished, d.reason, d.text) == (True, "stop", "abENa")
    # the earliest of several stop strings wins
    d = check_stop([0, 6, 1, 2, 3, 4], SamplingParams(stop=["END", "xb"]), [], decode)
    assert (d.reason, d.text) == ("stop", "a")


def test_streamed_text_holds_back_only_possible_stop_prefixes():
    checker = StopChecker(SamplingParams(stop=["END"], max_tokens=50), [], decode)
    deltas = [checker.push(t).text for t in [0, 2, 3, 1, 2]]  # a E N b E
    assert deltas == ["a", "", "", "ENb", ""]  # "EN" held until "b" rules out "END"
    last = checker.push(3)
    assert (last.finished, last.text) == (False, "")  # "EN" held again
    assert checker.push(4) == type(last)(True, "stop", "")  # "END": nothing more to emit


def test_eos_stop_ids_ignore_eos_and_length():
    assert check_stop([0, 1, 5, 0], SamplingParams(max_tokens=9), [5], decode) == \
        type(check_stop([], SamplingParams(), []))(True, "stop", "ab")  # eos: id kept, no text
    d = check_stop([0, 1, 5, 0], SamplingParams(max_tokens=4, ignore_eos=True), [5], decode)
    assert (d.reason, d.text) == ("length", "ab a")
    d = check_stop([0, 6, 1], SamplingParams(stop_token_ids=[6]), [5], decode)
    assert (d.reason, d.text) == ("stop", "a")
    d = check_stop([0, 1], SamplingParams(max_tokens=3), [5], decode)
    assert (d.finished, d.reason, d.text) == (False, None, "ab")
    checker = StopChecker(SamplingParams(max_tokens=1), [], None)
    assert checker.push(0).reason == "length"
    with pytest.raises(ValueError, match="after the request finished"):
        checker.push(1)


def test_stop_strings_need_decode_and_utf8_is_held_until_complete():
    with pytest.raises(ValueError, match="needs a decode callable"):
        StopChecker(SamplingParams(stop=["x"]), [], None)

    def byte_decode(ids: list[int]) -> str:
        return bytes(ids).decode("utf-8", errors="replace")

    euro = list("€".encode())  # 3 bytes: the first two decode to U+FFFD only
    checker = StopChecker(SamplingParams(max_tokens=10), [], byte_decode, context_ids=list(b"hi "))
    assert [checker.push(t).text for t in [*euro, ord("!")]] == ["", "", "€", "!"]


def test_top_k_ties_at_the_boundary_keep_the_lowest_ids():
    logits = torch.tensor([[1.0, 2.0, 2.0, 2.0, 0.0]])
    n = 300
    drawn = sample_tokens(logits.expand(n, -1), [SamplingParams(temperature=1.0, top_k=2)] * n,
                          list(range(n)), [0] * n)
    assert set(drawn) == {1, 2}


def _reference_kept(row: torch.Tensor, p: SamplingParams) -> list[int]:
    """Full stable sort, then top_k, then the nucleus on renormalised probabilities."""
    order = torch.sort(row, descending=True, stable=True).indices
    if p.top_k:
        order = order[: p.top_k]
    probs = torch.softmax(row[order] / p.temperature, dim=0)
    before = torch.cumsum(probs, 0) - probs
    return order[: max(int((before < p.top_p).sum()), 1)].tolist()


@pytest.mark.parametrize("scale", [0.05, 1.0, 4.0])  # flat (widening to a full sort) .. peaked
def test_kept_tokens_match_a_full_sort_reference(scale):
    from shardwright.serving.sampling import _kept_ids

    gen = torch.Generator().manual_seed(3)
    for top_k, top_p in [(0, 0.9), (0, 0.5), (40, 0.8), (700, 0.95), (5, 1.0)]:
        p = SamplingParams(temperature=0.7, top_k=top_k, top_p=top_p)
        row = (torch.randn(3000, generator=gen, dtype=torch.float64) * scale).round(decimals=2)  # ties
        scaled = (row - row.max()) / p.temperature
        assert _kept_ids(scaled, torch.exp(scaled), p).tolist() == _reference_kept(row, p), (top_k, top_p)


def test_text_held_for_incomplete_utf8_is_flushed_at_the_end():
    from shardwright.models.tokenizer import ByteTokenizer

    tok = ByteTokenizer()
    ids = list("é".encode()) + [0xE2]  # a complete 2-byte character, then a dangling lead byte
    decision = check_stop(ids, SamplingParams(max_tokens=len(ids)), [], tok.decode)
    assert decision.finished and decision.reason == "length"
    assert decision.text == "é\ufffd"
    eos = check_stop([0xC3, 7], SamplingParams(max_tokens=9), [7], tok.decode)
    assert eos.reason == "stop" and eos.text == "\ufffd"
