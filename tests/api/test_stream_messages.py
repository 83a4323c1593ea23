"""GenerateStream's messages from a request stream's events (api/servicers/inference.py
StreamMessages), on plain objects: tokens that are ready together go N to a message, with the
same token ids, text deltas and logprobs, in the same order, as one message per token."""

from __future__ import annotations

from shardwright.api.servicers.inference import StreamMessages
from shardwright.serving.batching import TokenEvent
from shardwright.serving.requests import RequestStream

TOKENS = [(5, "a"), (9, ""), (2, "é"), (7, " b"), (3, "c"), (None, "held"), (4, "d")]


def _finished_stream() -> RequestStream:
    stream = RequestStream("r1", [1, 2, 3], decode=lambda ids: "")
    for i, (token, text) in enumerate(TOKENS):
        logprob = (-0.5 * i, ((token, -0.5 * i), (0, -9.0))) if token is not None else None
        stream.push(TokenEvent("r1", token, text, logprob=logprob))
    stream.finish("length")
    return stream


def _flat(messages) -> list[tuple]:
    return [(t.token_id, t.text, t.logprob.SerializeToString() if t.HasField("logprob") else None)
            for m in messages for t in (m.tokens or [m])]


def test_ready_tokens_go_n_to_a_message_identical_to_one_per_message():
    one_stream, batched_stream = _finished_stream(), _finished_stream()
    items, done = one_stream.take(timeout_s=1)
    assert done and len(items) == len(TOKENS)  # all ready at once: one take gets them all
    one = StreamMessages(one_stream.output, 0).of(items)
    items, done = batched_stream.take(timeout_s=1)
    batched = StreamMessages(batched_stream.output, 3).of(items)
    assert [len(m.tokens) for m in batched] == [3, 3, 1]
    assert all(m.token_id == -1 and not m.text and not m.HasField("logprob") for m in batched)
    assert all(not m.tokens for m in one) and len(one) == len(TOKENS)
    assert _flat(batched) == _flat(one)
    assert [(t, x) for t, x, _ in _flat(one)] == [(-1 if t is None else t, x) for t, x in TOKENS]
    with_logprob = [lp for t, _, lp in _flat(one) if t >= 0]
    assert len(with_logprob) == 6 and all(lp is not None for lp in with_logprob)


def test_logprobs_stay_aligned_across_takes():
    """Tokens taken in several batches: each keeps its own logprob (the i-th token's, by count)."""
    stream = _finished_stream()
    items, _ = stream.take(timeout_s=1)
    messages = StreamMessages(stream.output, 2)
    first, rest = messages.of(items[:4]), messages.of(items[4:])
    reference = StreamMessages(_finished_stream().output, 1).of(items)
    assert _flat(first + rest) == _flat(reference)
