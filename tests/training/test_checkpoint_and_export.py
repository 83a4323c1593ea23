"""Checkpoints survive crashes mid-save; exports load in Shardwright and in transformers.

A crash is a rank dying (os._exit) after writing one file of the step-3 checkpoint, and an
exception while writing the manifest; both leave step 2 as the latest complete checkpoint,
loadable and continuing as the reference does. The tp = 2 model trained for 20 steps, exported to
a Hugging Face directory, gives the same logits at tp = 1 in Shardwright and in transformers.
"""

from __future__ import annotations

import json

import pytest
import torch

import train_cases
from shardwright.config import ParallelLayout
from shardwright.models import load_model
from shardwright.parallel.context import ParallelContext
from shardwright.parallel.launch import run_ranks
from shardwright.training import checkpoint as ckpt
from shardwright.training.checkpoint import latest_checkpoint, read_manifest
from shardwright.training.reshard import export_hf

# fp32, same weights, kernels that differ only in reduction order (TP split, fused qkv, SDPA):
# ~1e-6 seen; 1e-5 is the bound.
LOGIT_TOL = 1e-5
LOSS_TOL = 1e-4  # as in test_parallel_training: reordered fp32 reductions


def test_crash_of_a_rank_mid_save_keeps_the_previous_checkpoint(train_models, reference, tmp_path):
    layout = ParallelLayout(tp=2)
    with pytest.raises(Exception):
        run_ranks(train_cases.crash_main, 2, args=(layout, train_models["llama"], str(tmp_path)))
    assert (tmp_path / ".partial-step-00000003").is_dir(), "the crash should have hit step 3's save"
    assert not (tmp_path / "step-00000003").exists()
    latest = latest_checkpoint(tmp_path)
    assert latest == tmp_path / "step-00000002"
    manifest = read_manifest(latest)
    assert (manifest.step, manifest.layout) == (2, layout)
    assert manifest.data["batch_index"] == 2 and len(manifest.ranks) == 2
    # The survivor loads (at tp = 1: a reshard) and its next step is the reference's step 3.
    t = train_cases.trainer(ParallelLayout(), train_models["llama"])
    assert t.load(tmp_path) == 2
    ref = reference[1]["llama"]["metrics"][2]["loss"]
    assert abs(t.train_step()["loss"] - ref) <= LOSS_TOL


def test_exception_while_writing_manifest_keeps_previous_then_next_save_succeeds(
        train_models, reference, tmp_path, monkeypatch):
    t = train_cases.trainer(ParallelLayout(), train_models["gpt2"])
    train_cases.run_steps(t, 1)
    first = t.save(tmp_path)
    train_cases.run_steps(t, 1)

    def fail(directory, manifest):
        raise OSError("disk full (injected)")

    monkeypatch.setattr(ckpt, "write_manifest", fail)
    with pytest.raises(OSError, match="injected"):
        t.save(tmp_path)
    assert latest_checkpoint(tmp_path) == first
    monkeypatch.undo()
    second = t.save(tmp_path)
    assert latest_checkpoint(tmp_path) == second == tmp_path / "step-00000002"
    assert not (tmp_path / ".partial-step-00000002").exists()
    fresh = train_cases.trainer(ParallelLayout(), train_models["gpt2"])
    assert fresh.load(first) == 1
    losses = [m["loss"] for m in train_cases.run_steps(fresh, 2)]
    assert losses == [m["loss"] for m in reference[1]["gpt2"]["metrics"][1:3]]  # same layout: bitwise


def test_manifest_records_layout_step_data_and_rng(layout_run):
    root, _, _ = layout_run("tp2")
    manifest = json.loads((root / "llama" / "step-00000010" / "manifest.json").read_text())
    assert manifest["step"] == 10 and manifest["layout"]["tp"] == 2
    assert manifest["data"]["batch_index"] == 10
    assert manifest["model"]["architecture"] == "llama"
    assert [r["rank"] for r in manifest["ranks"]] == [0, 1] and manifest["ranks"][0]["rng"]["cpu"]
    assert sorted(manifest["files"]) == sorted(p.name for p in (root / "llama" / "step-00000010").glob("*-tp*"))
    assert latest_checkpoint(root / "llama") == root / "llama" / "step-00000020"


@pytest.mark.parametrize("name", ["llama", "gpt2"])
def test_export_from_tp2_loads_at_tp1_and_in_transformers(layout_run, name, tmp_path):
    transformers = pytest.importorskip("transformers", reason="transformers is the test-only reference")
    root, result, _ = layout_run("tp2")
    trained = result[name]["logits"]
    out = export_hf(root / name / "step-00000020", tmp_path / "hf")
    _, model = load_model(out, ParallelContext.single("cpu"))
    positions = torch.arange(train_cases.PROMPT.shape[1]).unsqueeze(0)
    with torch.no_grad():
        ours = model.full_logits(model(train_cases.PROMPT, positions))[0]
        hf = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
        theirs = hf(train_cases.PROMPT).logits[0]
    assert (ours - trained).abs().max() <= LOGIT_TOL, f"{name}: export at tp=1 vs trained tp=2"
    assert (theirs - trained).abs().max() <= LOGIT_TOL, f"{name}: transformers vs trained tp=2"
    assert trained.std() > 0.5, "logits of a trained model should not be near-constant"
