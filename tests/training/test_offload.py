"""Optimizer-state offload: the AdamW state of some blocks in host memory, updated on the CPU in a
background thread while the rest updates on the device.

On the CPU both sides run torch's single-tensor AdamW on the same values, so the run must equal
the plain optimizer's BITWISE (losses, grad norms, final parameters): any difference would be a
bug (a stale master, a missed gradient, a wrong LR), not rounding. Checkpoints move between the
two freely, and resume stays bitwise.
"""

from __future__ import annotations

import pytest
import torch

import train_cases
from shardwright.config import ModelSource, ParallelLayout
from shardwright.training.offload import OffloadedAdamW, offloaded_blocks
from shardwright.training.trainer import TrainConfig, TrainerRank


def trainer(model_dir: str, offload: float) -> TrainerRank:
    cfg = train_cases.train_config().model_copy(update={"offload_optimizer": offload})
    return TrainerRank(cfg, ParallelLayout()).start(ModelSource(path=model_dir), device="cpu")


def losses(metrics):
    return [(m["loss"], m["grad_norm"]) for m in metrics]


@pytest.mark.parametrize("offload", [0.5, 1.0])
def test_offloaded_run_equals_the_plain_optimizer_bitwise(train_models, reference, offload):
    t = trainer(train_models["llama"], offload)
    assert isinstance(t.optimizer, OffloadedAdamW)
    got = losses(train_cases.run_steps(t, 10))
    plain = trainer(train_models["llama"], 0.0)
    assert got == losses(train_cases.run_steps(plain, 10))
    assert got == losses(reference[1]["llama"]["metrics"][:10])
    for a, b in zip(t.model.parameters(), plain.model.parameters(), strict=True):
        assert torch.equal(a, b)
    sizes, plain_sizes = t.optimizer_bytes(), plain.optimizer_bytes()
    assert sizes["host"] > 0 and sizes["device"] < plain_sizes["device"] and plain_sizes["host"] == 0
    if offload == 1.0:  # every block's state on the host: only embeddings, head and norms stay
        block_params = list(t.model.blocks.parameters())
        moved = sum(2 * p.numel() * 4 + 4 for p in block_params)  # exp_avg, exp_avg_sq, the step scalar
        assert plain_sizes["device"] - sizes["device"] == moved


def test_checkpoints_move_between_offloaded_and_plain_and_resume_bitwise(train_models, reference, tmp_path):
    ref = [m["loss"] for m in reference[1]["gpt2"]["metrics"]]
    t = trainer(train_models["gpt2"], 0.5)
    train_cases.run_steps(t, 4)
    saved_offloaded = t.save(tmp_path / "offloaded")
    plain = trainer(train_models["gpt2"], 0.0)
    assert plain.load(saved_offloaded) == 4
    assert [m["loss"] for m in train_cases.run_steps(plain, 3)] == ref[4:7]
    saved_plain = plain.save(tmp_path / "plain")
    back = trainer(train_models["gpt2"], 1.0)
    assert back.load(saved_plain) == 7
    assert [m["loss"] for m in train_cases.run_steps(back, 3)] == ref[7:10]


def test_offload_share_is_validated_and_picks_the_first_blocks():
    assert list(offloaded_blocks(12, 0.5)) == list(range(6))
    assert list(offloaded_blocks(4, 0.0)) == []
    assert list(offloaded_blocks(4, 0.1)) == [0] and list(offloaded_blocks(1, 0.5)) == [0]  # never silently none
    assert list(offloaded_blocks(4, 1.0)) == [0, 1, 2, 3]
    with pytest.raises(ValueError, match="offload_optimizer"):
        TrainConfig(data=train_cases.train_config().data, offload_optimizer=1.5)


def test_offload_at_tp2_equals_the_plain_optimizer_bitwise(train_models):
    from shardwright.parallel.launch import run_ranks

    layout = ParallelLayout(tp=2)
    runs = [run_ranks(train_cases.offload_main, 2, args=(layout, train_models["llama"], f))[0] for f in (0.0, 0.5)]
    assert runs[0] == runs[1]
