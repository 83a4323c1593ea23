"""Sharded models at tp = 2 and 4 against the tp = 1 model on the same weights.

Both families, GQA with kv heads split (kv=4, 2 at tp=2) and replicated (kv=2, 1 at tp=4),
tied and untied embeddings, a vocabulary (203) that does not divide by tp (padding), and a
checkpoint split across two files. Logits and every gradient are compared in fp32.
"""

from __future__ import annotations

import pytest
import torch

import tp_cases
from shardwright.parallel.launch import run_ranks

# fp32 sums of <= 128 products reordered by the all-reduce: differences ~1e-7, bound 1e-5.
LOGIT_TOL = 1e-5
GRAD_TOL = 1e-5
NAMES = ["llama", "llama_gqa", "llama_mqa_tied", "gpt2"]


def batch(rng: torch.Generator, vocab: int = 203) -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.randint(0, vocab, (2, 24), generator=rng)
    targets = torch.randint(0, vocab, (2, 24), generator=rng)
    targets[0, :3] = -100  # ignored positions carry no loss
    return ids, targets


def assemble(pieces_by_rank: list[list[tuple]]) -> dict[str, torch.Tensor]:
    """Full checkpoint-shaped gradients; pieces written by several ranks must agree."""
    full: dict[str, torch.Tensor] = {}
    for pieces in pieces_by_rank:
        for name, out, inn, conv1d, grad in pieces:
            g = grad.t() if conv1d and grad.dim() == 2 else grad
            index = [slice(None)] * g.dim()
            out_dim, in_dim = (1, 0) if conv1d and g.dim() == 2 else (0, 1)
            if out is not None:
                index[out_dim] = slice(*out)
            if inn is not None:
                index[in_dim] = slice(*inn)
            full.setdefault(name, {})[tuple((s.start, s.stop) for s in index)] = g
    return {name: _merge(parts) for name, parts in full.items()}


def _merge(parts: dict) -> torch.Tensor:
    shape = [max(s[1] if s[1] is not None else g.shape[d] for s, g in
                 ((k[d], v) for k, v in parts.items())) for d in range(len(next(iter(parts))))]
    out = torch.zeros(shape)
    for key, g in parts.items():
        out[tuple(slice(a, b) for a, b in key)] = g
    return out


@pytest.fixture(scope="module")
def reference(checkpoints):
    rng = torch.Generator().manual_seed(1234)
    cases = [(str(checkpoints[n]), *batch(rng)) for n in NAMES]
    return cases, tp_cases.run_logits_grads(0, 1, cases)


@pytest.mark.parametrize("tp", [2, 4])
def test_logits_and_gradients_match_tp1(reference, tp):
    cases, ref = reference
    by_rank = run_ranks(tp_cases.run_logits_grads, tp, args=(cases,))
    for i, name in enumerate(NAMES):
        ref_logits, ref_loss, ref_pieces = ref[i]
        ref_grads = assemble([ref_pieces])
        for rank_results in by_rank:
            logits, loss, _ = rank_results[i]
            assert (logits - ref_logits).abs().max() <= LOGIT_TOL, f"{name} tp={tp} logits"
            assert abs(float(loss - ref_loss)) <= LOGIT_TOL, f"{name} tp={tp} loss"
        grads = assemble([r[i][2] for r in by_rank])
        assert grads.keys() == ref_grads.keys()
        for key, g in ref_grads.items():
            assert g.abs().max() > 0, f"{name}: reference gradient of {key} is zero"
            err = (grads[key] - g).abs().max()
            assert err <= GRAD_TOL, f"{name} tp={tp} grad {key} differs by {err}"
