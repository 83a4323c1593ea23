"""Fast unit tests: LR schedule, clipping, global-norm ownership, data loader, precision."""

from __future__ import annotations

import json
import math

import pytest
import torch

import train_cases
from model_helpers import tiny_spec
from shardwright.config import ParallelLayout
from shardwright.models.tokenizer import ByteTokenizer
from shardwright.parallel.context import ParallelContext
from shardwright.parallel.pipeline import PipelineSchedule, bubble_formula
from shardwright.training.data import DataConfig, PackedLoader, build_loader, pack, read_documents
from shardwright.training.optim import OptimConfig, build_optimizer, clip_grads_, lr_at
from shardwright.training.sharding import owns, param_pieces, stage_model


def test_bubble_formula_and_schedule_names():
    assert bubble_formula(1, 4) == 0.0 and bubble_formula(2, 4) == 0.2 and bubble_formula(4, 8) == 3 / 11
    with pytest.raises(ValueError, match="schedule='zb'"):
        PipelineSchedule(ParallelContext.single("cpu"), hidden_size=8, dtype=torch.float32, schedule="zb")


def test_lr_warmup_then_cosine_to_min():
    cfg = OptimConfig(lr=1.0, min_lr=0.1, warmup_steps=4, decay_steps=14)
    assert [lr_at(s, cfg) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert lr_at(4, cfg) == 1.0  # cosine starts at the peak
    assert lr_at(9, cfg) == pytest.approx(0.55)  # half-way: (1 + 0.1) / 2
    assert lr_at(14, cfg) == pytest.approx(0.1) and lr_at(100, cfg) == pytest.approx(0.1)
    decay = [lr_at(s, cfg) for s in range(4, 15)]
    assert all(a > b for a, b in zip(decay, decay[1:]))


def test_optim_config_rejects_min_above_peak():
    with pytest.raises(ValueError, match="min_lr=2.0 exceeds lr=1.0"):
        OptimConfig(lr=1.0, min_lr=2.0)


def test_clip_scales_to_max_norm_and_leaves_small_gradients():
    p = torch.nn.Parameter(torch.zeros(4))
    p.grad = torch.tensor([3.0, 4.0, 0.0, 0.0])
    coef = clip_grads_([p], 5.0, 1.0)
    assert coef == pytest.approx(1 / (5 + 1e-6)) and p.grad.norm() == pytest.approx(1.0, rel=1e-6)
    assert clip_grads_([p], 1.0, 2.0) == 1.0 and p.grad.norm() == pytest.approx(1.0, rel=1e-6)


def test_weight_decay_applies_to_matrices_only():
    _, model = _single_model()
    groups = build_optimizer(model, OptimConfig(weight_decay=0.1)).param_groups
    assert {g["weight_decay"] for g in groups} == {0.1, 0.0}
    assert all(p.dim() >= 2 for p in groups[0]["params"]) and all(p.dim() == 1 for p in groups[1]["params"])


def _single_model():
    from shardwright.models import build_model
    from shardwright.parallel.context import ParallelContext

    spec = tiny_spec("gpt2")
    return spec, build_model(spec, ParallelContext.single("cpu"))


@pytest.mark.parametrize("arch,kv,layout", [
    ("llama", 2, ParallelLayout(tp=2, pp=2)),
    ("llama", 1, ParallelLayout(tp=4)),  # the one kv head replicated on 4 ranks
    ("gpt2", 4, ParallelLayout(tp=2, pp=2)),  # tied: the last stage's LM-head copy is skipped
])
def test_owned_pieces_count_every_model_element_once(arch, kv, layout):
    spec = tiny_spec(arch, num_kv_heads=kv, num_layers=2, tie_word_embeddings=arch == "gpt2")
    total = 0
    for tp_rank in range(layout.tp):
        for pp_rank in range(layout.pp):
            model = stage_model(spec, layout, tp_rank, pp_rank)
            for name, param, pieces in param_pieces(model):
                if spec.tie_word_embeddings and name == "lm_head.weight":
                    continue
                width = math.prod(param.shape[1:])
                total += sum((p.row_stop - p.row_start) * width for p in pieces if owns(p, tp_rank))
    assert total == spec.num_parameters


def test_loader_dp_slices_union_to_the_single_process_batch():
    windows = torch.arange(40 * 5).view(40, 5)
    single = PackedLoader(windows, global_batch_size=8, seed=1)
    ranks = [PackedLoader(windows, global_batch_size=8, seed=1, dp_rank=r, dp=2) for r in range(2)]
    for _ in range(12):  # 5 batches per epoch: crosses two epoch boundaries
        inputs, targets = single.next_batch()
        parts = [r.next_batch() for r in ranks]
        assert torch.equal(torch.cat([p[0] for p in parts]), inputs)
        assert torch.equal(targets[:, :-1], inputs[:, 1:])
    assert single.epoch == 2


def test_loader_is_deterministic_and_resumes_exactly():
    windows = torch.arange(30 * 3).view(30, 3)
    a = PackedLoader(windows, global_batch_size=4, seed=7)
    first = [a.next_batch()[0] for _ in range(9)]
    state = a.state_dict()
    rest = [a.next_batch()[0] for _ in range(5)]
    b = PackedLoader(windows, global_batch_size=4, seed=7)
    b.load_state_dict(json.loads(json.dumps(state)))
    assert all(torch.equal(x, y) for x, y in zip(rest, [b.next_batch()[0] for _ in range(5)]))
    again = PackedLoader(windows, global_batch_size=4, seed=7)
    assert all(torch.equal(x, again.next_batch()[0]) for x in first)
    other = PackedLoader(windows, global_batch_size=4, seed=8)
    assert not torch.equal(first[0], other.next_batch()[0])
    with pytest.raises(ValueError, match="global_batch_size=4 != configured global_batch_size=2"):
        PackedLoader(windows, global_batch_size=2, seed=7).load_state_dict(state)


def test_corpus_reading_packing_and_errors(tmp_path):
    (tmp_path / "a.txt").write_text("hello")
    (tmp_path / "b.jsonl").write_text('{"text": "xy"}\n\n{"text": "z"}\n')
    docs = read_documents(tmp_path)
    assert docs == ["hello", "xy", "z"]
    windows = pack(docs, ByteTokenizer(), seq_len=3, vocab_size=256)
    assert windows.tolist() == [list(b"hell"), list(b"o\n\nx"), list(b"y\n\nz")]
    with pytest.raises(ValueError, match="vocab_size=100"):
        pack(docs, ByteTokenizer(), seq_len=3, vocab_size=100)
    (tmp_path / "c.jsonl").write_text('{"txt": 1}\n')
    with pytest.raises(ValueError, match="c.jsonl:1"):
        read_documents(tmp_path)


def test_example_corpus_builds_a_loader():
    cfg = DataConfig(path=train_cases.CORPUS, seq_len=128, global_batch_size=8)
    loader = build_loader(cfg, ByteTokenizer(), vocab_size=256)
    assert loader.windows.shape[0] >= 200  # ~30 KB of text
    inputs, _ = loader.next_batch()
    assert inputs.shape == (8, 128)


def test_bf16_autocast_trains_close_to_fp32(train_models):
    fp32 = train_cases.trainer(ParallelLayout(), train_models["llama"])
    bf16 = train_cases.trainer(ParallelLayout(), train_models["llama"], precision="bfloat16")
    a = [m["loss"] for m in train_cases.run_steps(fp32, 3)]
    b = [m["loss"] for m in train_cases.run_steps(bf16, 3)]
    # bf16 keeps 8 mantissa bits: the loss (~5) moves by ~1e-2; the updates stay fp32.
    assert max(abs(x - y) for x, y in zip(a, b)) < 0.05
    assert a != b, "autocast had no effect"
