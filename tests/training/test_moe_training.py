"""Training a mixture-of-experts model with the router's load-balancing loss, against transformers
and across expert parallelism.

A random Mixtral-style checkpoint (4 experts, top 2) whose config.json sets output_router_logits and
router_aux_loss_coef=0.5: the trainer's first loss (one micro-batch, one process) is transformers'
cross-entropy plus 0.5 * its aux_loss on the same batch; and 4 steps at ep = 2 (two gloo ranks, two
micro-batches) give the losses and global gradient norms of the single-process run.
"""

from __future__ import annotations

import pytest
import torch

import moe_train_cases
from model_helpers import tiny_spec
from shardwright.models.random_init import write_random_checkpoint
from shardwright.parallel.launch import run_ranks

transformers = pytest.importorskip("transformers", reason="transformers is the test-only reference")

# A mean of fp32 terms through other kernels than transformers' (~1e-7 seen).
HF_LOSS_TOL = 1e-5
# fp32, ep = 2 splits the expert rows and sums nothing in another order; Adam steps amplify ~1e-7
# differences a little over 4 steps (~1e-7 seen).
EP_TOL = 1e-5
AUX = 0.5


@pytest.fixture(scope="module")
def moe_dir(tmp_path_factory):
    spec = tiny_spec("llama", vocab_size=259, num_kv_heads=2, num_experts=4, experts_per_token=2,
                     router_aux_loss_coef=AUX)
    return str(write_random_checkpoint(tmp_path_factory.mktemp("moe_train") / "mixtral", spec, seed=9, std=0.2))


def test_first_loss_is_transformers_loss_with_aux(moe_dir):
    t = moe_train_cases.TrainerRank(moe_train_cases.train_config(1), moe_train_cases.ParallelLayout())
    t.start(moe_train_cases.ModelSource(path=moe_dir), device="cpu")
    assert t.aux_loss_coef == AUX, "the checkpoint's router_aux_loss_coef (output_router_logits) is used"
    inputs, targets = moe_train_cases.TrainerRank(moe_train_cases.train_config(1), t.layout).start(
        moe_train_cases.ModelSource(path=moe_dir), device="cpu").data.next_batch()
    loss = t.train_step()["loss"]
    hf = transformers.AutoModelForCausalLM.from_pretrained(moe_dir).float()
    with torch.no_grad():
        out = hf(inputs, output_router_logits=True)
        ce = torch.nn.functional.cross_entropy(out.logits.reshape(-1, out.logits.shape[-1]), targets.reshape(-1),
                                               ignore_index=-100)
    assert AUX * float(out.aux_loss) > 100 * HF_LOSS_TOL, "the aux term must be large enough to be tested"
    assert abs(loss - float(ce + AUX * out.aux_loss)) <= HF_LOSS_TOL
    off = moe_train_cases.run_training(0, 1, {}, moe_dir, 1, aux=0.0)[0]["loss"]
    assert abs(off - float(ce)) <= HF_LOSS_TOL, "router_aux_loss_coef: 0 turns it off"


def test_ep2_training_and_checkpoint_equal_single_process(moe_dir, tmp_path):
    """Also the checkpoints: the ep = 2 one (a file per EP rank, each with its experts) exports the
    same Hugging Face tensors as the single-process one."""
    from shardwright.training.checkpoint import latest_checkpoint, read_manifest
    from shardwright.training.reshard import gather_hf

    ref = moe_train_cases.run_training(0, 1, {}, moe_dir, 2, None, str(tmp_path / "ep1"))
    by_rank = run_ranks(moe_train_cases.run_training, 2, args=({"ep": 2}, moe_dir, 2, None, str(tmp_path / "ep2")))
    tensors = {}
    for name in ("ep1", "ep2"):
        path = latest_checkpoint(tmp_path / name)
        tensors[name] = gather_hf(path, read_manifest(path))
    assert set(tensors["ep1"]) == set(tensors["ep2"]) and any(".experts.3." in k for k in tensors["ep2"])
    for key, value in tensors["ep1"].items():
        assert (tensors["ep2"][key] - value).abs().max() <= EP_TOL, key
    assert ref[-1]["loss"] < ref[0]["loss"], "the reference must learn"
    for metrics in by_rank:
        for step, (a, b) in enumerate(zip(metrics, ref), 1):
            assert abs(a["loss"] - b["loss"]) <= EP_TOL, f"step {step}: loss {a['loss']} vs {b['loss']}"
            assert abs(a["grad_norm"] - b["grad_norm"]) <= EP_TOL * b["grad_norm"], f"step {step}: grad norm"
            assert b["grad_norm"] > 0.5, "clipping (max_grad_norm=0.5) must be active to be tested"
