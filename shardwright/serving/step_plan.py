"""One step's plan: the packed chunks of the sequences it runs, as the scheduler
(serving/batching.py) makes it and the engine turns it into the workers' message.

A plan packs, with no padding, one `SeqChunk` per sequence; the flat accessors give the packed
token ids, positions, slots and sampled rows in chunk order, each O(the step's tokens).
"""

from __future__ import annotations

from dataclasses import dataclass

from shardwright.serving.kv_spill import SpillOp
from shardwright.serving.sampling import SamplingParams


@dataclass(frozen=True, slots=True)
class SeqChunk:
    """Tokens of one sequence in one step; positions start_pos .. start_pos + len - 1."""

    seq_id: int
    request_id: str
    token_ids: tuple[int, ...]
    start_pos: int
    block_table: tuple[int, ...]  # after growing for this step
    slots: tuple[int, ...]  # where each token's K/V are written
    sample: bool  # the chunk ends at the last known token: sample its logits
    params: SamplingParams
    seed: int
    step: int  # index (within the request) of the token sampled from this chunk
    feedback: bool = False  # token_ids[0] is unknown here: the token sampled in the previous step
    # The sequence's tokens before start_pos, for a sampled chunk whose params have penalties
    # (the workers add this chunk's own tokens); empty otherwise.
    context: tuple[int, ...] = ()
    # Speculative decoding: token_ids[1:] are this many draft tokens to verify (serving/speculative.py);
    # the chunk samples k + 1 positions and its update takes a list of 1..k + 1 tokens.
    num_draft: int = 0


@dataclass(frozen=True)
class StepPlan:
    """One packed step. The flat accessors are O(step tokens); the engine calls each once."""

    step_id: int
    chunks: tuple[SeqChunk, ...]
    spill_ops: tuple[SpillOp, ...] = ()  # KV copies the workers run before this plan's forward

    def token_ids(self) -> list[int]:
        """Packed token ids; a feedback chunk's first token is -1 (see `feedback()`)."""
        return [t for c in self.chunks for t in c.token_ids]

    def feedback(self) -> tuple[list[int], list[int]]:
        """(packed indices, seq_ids) of tokens the workers fill in from their previous step."""
        index, seqs, at = [], [], 0
        for c in self.chunks:
            if c.feedback:
                index.append(at)
                seqs.append(c.seq_id)
            at += len(c.token_ids)
        return index, seqs

    def positions(self) -> list[int]:
        return [p for c in self.chunks for p in range(c.start_pos, c.start_pos + len(c.token_ids))]

    def slot_mapping(self) -> list[int]:
        return [s for c in self.chunks for s in c.slots]

    @property
    def query_lens(self) -> list[int]:
        return [len(c.token_ids) for c in self.chunks]

    @property
    def context_lens(self) -> list[int]:
        """Tokens in each chunk's cache after this step: start_pos + query length."""
        return [c.start_pos + len(c.token_ids) for c in self.chunks]

    def block_tables(self) -> list[tuple[int, ...]]:
        return [c.block_table for c in self.chunks]

    def sample_indices(self) -> list[int]:
        """Packed indices of the tokens whose logits are sampled, in chunk order."""
        out, end = [], 0
        for c in self.chunks:
            end += len(c.token_ids)
            if c.sample:
                out.append(end - 1)
        return out

    def sampled_chunks(self) -> list[SeqChunk]:
        """The chunks whose last token is sampled, aligned with `sample_indices()`: their
        `params`, `seed` and `step` are `sample_tokens`'s arguments."""
        return [c for c in self.chunks if c.sample]

    def sampled_seq_ids(self) -> list[int]:
        """seq_ids of the sampled chunks: key `update`'s `sampled` dict with these."""
        return [c.seq_id for c in self.chunks if c.sample]
