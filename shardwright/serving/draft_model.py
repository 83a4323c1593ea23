"""The draft model of speculative decoding (BiLD: Kim et al. 2023, "Speculative Decoding with Big
Little Decoder"): a small model with the target's vocabulary proposes up to k tokens per step.

Where it runs: in the same gang, inside the sampler worker (TP rank 0 of the one pipeline
stage), as a second, unsharded model with its own paged KV cache addressed by the target's block
tables (a position has the same slot in both caches). Why there and not in a gang of its own:
- one message per step still: the k sequential draft steps run inside the worker's step, with no
  controller round trip between them (each would cost a dispatch, ~0.35-1.5 ms, k times a step),
  and the draft tokens reach the target's forward without leaving the process;
- the draft's distributions q, which rejection sampling needs, are on the rank that samples;
- no extra actors or devices to place, fail or rebuild: the draft is loaded and reloaded with
  the gang. On this project's CPU machines a separate gang would only compete for the same cores.
The cost: with tp > 1 the other TP ranks wait while rank 0 drafts (a small model: a short wait),
then receive the drafts by one broadcast over the TP group. Hence method=draft needs pp = 1
(drafts are made before the first stage and verified on the last) and cp = 1.

Per step, for the drafted sequences (chunks with `num_draft` placeholder tokens from the
scheduler): the draft first catches up on the real tokens it has not seen (`DraftTracker` knows
how many it holds, usually 1 or 2), then runs up to k one-token steps. BiLD's *fallback* policy:
drafting stops for a sequence once the draft's most likely token has probability (softmax at
temperature 1) below `fallback_threshold`, and the target takes over at that position. A greedy
request's drafts are the draft's argmax; a sampled request's are drawn from the draft's filtered
distribution q (its temperature, top-k, top-p; no penalties) with the request's seed on a stream
of its own, and q goes to the rejection sampler (speculative.verify_chunk). Every chunk of the
step (prompt chunks too) is mirrored into the draft's cache, so drafting can start at once.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from shardwright.models.paged import PagedBatch
from shardwright.serving.sampling import SamplingParams, uniform
from shardwright.serving.speculative import DRAFT_STREAM, draw, filtered_probs, stream_seed

PLACEHOLDER = -1  # a draft token the worker fills in


@dataclass(eq=False)
class DraftPlaceholders:
    """The scheduler's `Proposer` for method=draft: k placeholders that the worker's draft model
    replaces (possibly fewer: fallback), the slots being reserved by the scheduler."""

    k: int

    def propose(self, tokens: list[int], k: int) -> list[int]:
        return [PLACEHOLDER] * min(k, self.k)


@dataclass
class DraftStep:
    """The draft model's part of one step (in StepMessage.draft). Catch-up batch: for every chunk
    of the step, the real tokens the draft has not cached yet (packed like the target's); `rows`
    are the indices, among the step's chunks, of the drafted ones, `row_index` the packed index of
    their last real token, `ks` their most drafts."""

    token_ids: list[int]
    positions: list[int]
    slot_mapping: list[int]
    query_lens: list[int]
    block_tables: list[list[int]]
    rows: list[int]
    row_index: list[int]
    ks: list[int]
    fallback_threshold: float = 0.0


@dataclass
class DraftTracker:
    """Controller side: how many tokens of each request the draft's cache holds, and the
    `DraftStep` of each plan. Assumes one plan in flight (pp = 1, no lookahead)."""

    block_size: int
    fallback_threshold: float = 0.0
    cached: dict[str, int] = field(default_factory=dict)  # request_id -> tokens in the draft's cache
    num_drafted: int = 0  # drafts the worker made (after fallbacks), since construction

    def plan(self, plan, tokens_of) -> DraftStep | None:
        """The DraftStep of `plan` (None when the draft has nothing to cache or draft);
        `tokens_of(request_id)` gives a live request's tokens so far."""
        step = DraftStep([], [], [], [], [], [], [], [], self.fallback_threshold)
        bs = self.block_size
        for i, c in enumerate(plan.chunks):
            start = self.cached.get(c.request_id, 0)
            end = c.start_pos + (1 if c.num_draft else len(c.token_ids))  # real tokens of the chunk
            if start >= end:
                continue
            ids = list(tokens_of(c.request_id)[start:c.start_pos]) + list(c.token_ids[:end - c.start_pos])
            step.token_ids += ids
            step.positions += range(start, end)
            step.slot_mapping += [c.block_table[p // bs] * bs + p % bs for p in range(start, end)]
            step.query_lens.append(len(ids))
            step.block_tables.append(list(c.block_table))
            self.cached[c.request_id] = end
            if c.num_draft:
                step.rows.append(i)
                step.row_index.append(len(step.token_ids) - 1)
                step.ks.append(c.num_draft)
        return step if step.token_ids else None  # prompt chunks too: the draft mirrors every token

    def update(self, plan, step: DraftStep, drafted: list[int], sampled: dict, live) -> None:
        """After the step (`drafted`: drafts made per `step.rows`, `sampled`: seq_id -> the
        step's tokens): a drafted request's draft cache holds its verified tokens, at most the ones
        it was fed (the last token and every draft but the last, or after a fallback all of
        them); requests no longer `live(request_id)` are forgotten."""
        self.num_drafted += sum(drafted)
        for i, n in zip(step.rows, drafted):
            c = plan.chunks[i]
            got = sampled.get(c.seq_id)
            accepted = len(got) - 1 if isinstance(got, list) else 0
            fed = n + 1 if n < c.num_draft else n
            self.cached[c.request_id] = c.start_pos + min(accepted + 1, fed)
        for rid in [r for r in self.cached if not live(r)]:
            del self.cached[rid]


# ------------------------------------------------------------------------------ worker side
@torch.inference_mode()
def run_draft(model, cache, step: DraftStep, block_size: int, params: list[SamplingParams], seeds: list[int],
              steps: list[int]) -> tuple[list[list[int]], list[torch.Tensor | None]]:
    """Draft tokens for each drafted row (fewer than its k after a fallback) and, for sampled
    rows, q [num_drafts, vocab] (float64) of each draft; `params/seeds/steps` per drafted row."""
    device = cache.keys[0].device if cache.keys else torch.device("cpu")
    batch = PagedBatch.build(step.token_ids, step.positions, step.slot_mapping, step.query_lens, step.block_tables,
                             block_size, step.row_index, device)
    logits = model.full_logits(model.forward_packed(batch.token_ids, batch, cache)).float()
    n = len(step.rows)
    if n == 0:  # only caching this step's tokens
        return [], []
    drafts: list[list[int]] = [[] for _ in range(n)]
    probs: list[list[torch.Tensor]] = [[] for _ in range(n)]
    tables = [step.block_tables[_table_index(step, r)] for r in range(n)]
    last_pos = [step.positions[i] for i in step.row_index]
    active = list(range(n))
    for j in range(max(step.ks)):
        keep = []
        for row_at, r in enumerate(active):
            if step.fallback_threshold > 0 and float(
                    torch.softmax(logits[row_at].double(), dim=-1).max()) < step.fallback_threshold:
                continue  # BiLD fallback: the draft is unsure, the target takes over here
            p = params[r]
            if p.greedy:
                token = int(logits[row_at].max(dim=0).indices)
            else:
                q = filtered_probs(logits[row_at], p)
                token = draw(q, uniform(stream_seed(seeds[r], DRAFT_STREAM), steps[r] + j))
                probs[r].append(q)
            drafts[r].append(token)
            if len(drafts[r]) < step.ks[r]:
                keep.append(r)
        active = keep
        if not active:
            break
        pos = [last_pos[r] + 1 + j for r in active]
        slots = [tables[r][p // block_size] * block_size + p % block_size for r, p in zip(active, pos)]
        batch = PagedBatch.build([drafts[r][-1] for r in active], pos, slots, [1] * len(active),
                                 [tables[r] for r in active], block_size, list(range(len(active))), device)
        logits = model.full_logits(model.forward_packed(batch.token_ids, batch, cache)).float()
    return drafts, [torch.stack(q) if q else None for q in probs]


def _table_index(step: DraftStep, r: int) -> int:
    """Index into step.block_tables of drafted row r (the catch-up batch's chunk holding it)."""
    ends, at = [], 0
    for n in step.query_lens:
        at += n
        ends.append(at - 1)
    return ends.index(step.row_index[r])


def fill_drafts(token_ids: list[int], positions: list[int], slot_mapping: list[int], query_lens: list[int],
                sample_index: list[int], chunk_rows: list[int], drafts: list[list[int]]):
    """The step's packed lists with each drafted chunk's placeholders replaced by its drafts and
    the unused ones dropped; returns (token_ids, positions, slot_mapping, query_lens,
    sample_index, draft_lens per sampled row). `chunk_rows` are the drafted chunks' indices."""
    new_drafts = dict(zip(chunk_rows, drafts))
    ids, pos, slots, lens, samples = [], [], [], [], []
    sample_set, at = set(sample_index), 0
    draft_lens = []
    for i, n in enumerate(query_lens):
        end = at + n
        if i in new_drafts:
            d = new_drafts[i]
            keep = at + 1 + len(d)
            ids += [token_ids[at], *d]
            pos += positions[at:keep]
            slots += slot_mapping[at:keep]
            lens.append(1 + len(d))
        else:
            ids += token_ids[at:end]
            pos += positions[at:end]
            slots += slot_mapping[at:end]
            lens.append(n)
        if end - 1 in sample_set:
            samples.append(len(ids) - 1)
            draft_lens.append(len(new_drafts[i]) if i in new_drafts else 0)
        at = end
    return ids, pos, slots, lens, samples, draft_lens
