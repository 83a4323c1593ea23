"""Checkpoints survive a crash after any filesystem operation of a save, and corruption is caught.

The crash: a forked copy of a trained rank saves step 3 into a copy of a root that holds steps 1
and 2 (keep = 2, so the save also prunes step 1) and dies with os._exit right after its N-th
filesystem operation, for every N of that save (staging writes, fsyncs, renames, the publish, the
pointer move, the prune). Whatever N, the root then resolves to a checkpoint that verifies: step 3
once its publishing rename happened, step 2 before; a fresh trainer resumed from the root loads it
and takes the reference's next step bitwise (same layout). The interposed operations are the four
of training.checkpoint_root through which every change of a save goes.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import shutil
from pathlib import Path

import pytest

import train_cases
from shardwright.config import ParallelLayout
from shardwright.parallel.launch import run_ranks
from shardwright.training import checkpoint_root as fs
from shardwright.training.checkpoint import (CheckpointError, load_checkpoint, read_manifest, resolve_checkpoint,
                                             verify_checkpoint)

LOSS_TOL = 1e-4  # as in test_parallel_training: a tp=2 checkpoint resumed at tp=1 reorders fp32 reductions
OPS = ("write_file", "fsync_path", "rename", "remove_tree")
CRASH_EXIT = 17


def _interpose(on_op) -> None:
    """Route the four filesystem operations of a save through `on_op(name, args)` after each."""
    for name in OPS:
        real = getattr(fs, name)

        def op(*args, _real=real, _name=name):
            _real(*args)
            on_op(_name, args)

        setattr(fs, name, op)


def _save_and_die_at(trainer, root: Path, n: int) -> None:
    """(In the forked child) save, and os._exit(CRASH_EXIT) right after operation number n."""
    done = [0]

    def on_op(name, args):
        done[0] += 1
        if done[0] == n:
            os._exit(CRASH_EXIT)

    _interpose(on_op)
    trainer.save(root)
    os._exit(0)


@pytest.fixture(scope="module")
def at_step_3(train_models, tmp_path_factory):
    """(trainer at step 3, root with steps 1 and 2 published, the ops of saving step 3 there)."""
    t = train_cases.trainer(ParallelLayout(), train_models["llama"])
    t.config = t.config.model_copy(update={"keep_checkpoints": 2})
    template = tmp_path_factory.mktemp("ckpt-template")
    train_cases.run_steps(t, 2, template, save_at=(1, 2))
    train_cases.run_steps(t, 1)
    probe = tmp_path_factory.mktemp("ckpt-probe") / "root"
    shutil.copytree(template, probe)
    ops: list[tuple[str, tuple]] = []
    saved = {name: getattr(fs, name) for name in OPS}
    try:
        _interpose(lambda name, args: ops.append((name, args)))
        t.save(probe)
    finally:
        for name, real in saved.items():
            setattr(fs, name, real)
    return t, template, ops


def test_the_save_is_a_sequence_of_staging_writes_fsyncs_renames_pointer_and_prune(at_step_3):
    _, _, ops = at_step_3
    names = [n for n, _ in ops]
    assert names.count("write_file") == 4  # model, optimizer, manifest, pointer
    targets = [Path(args[1]).name for n, args in ops if n == "rename"]
    assert targets[-3:] == ["step-00000003", "latest", ".pruned-step-00000001"], targets
    assert names[-1] == "remove_tree" and names.count("fsync_path") >= 8


def test_a_crash_after_any_operation_leaves_the_newest_complete_checkpoint(at_step_3, reference, tmp_path,
                                                                           train_models):
    t, template, ops = at_step_3
    publish = next(i for i, (n, args) in enumerate(ops, 1)
                   if n == "rename" and Path(args[1]).name == "step-00000003")
    ref_step_4 = reference[1]["llama"]["metrics"][3]["loss"]
    ref_step_3 = reference[1]["llama"]["metrics"][2]["loss"]
    fork = multiprocessing.get_context("fork")
    for n in range(1, len(ops) + 1):
        root = tmp_path / f"crash-{n:02d}"
        shutil.copytree(template, root)
        child = fork.Process(target=_save_and_die_at, args=(t, root, n))
        child.start()
        child.join(120)
        if child.is_alive():  # never expected: end the process this test started
            child.kill()
            child.join()
        assert child.exitcode == CRASH_EXIT, f"operation {n}: the child ended with {child.exitcode}"
        expected = root / ("step-00000003" if n >= publish else "step-00000002")
        found = resolve_checkpoint(root)
        assert found == expected, f"crash after operation {n} ({ops[n - 1][0]}): resolved {found}"
        verify_checkpoint(found)
        fresh = train_cases.trainer(ParallelLayout(), train_models["llama"])
        assert fresh.load(root) == read_manifest(expected).step
        loss = fresh.train_step()["loss"]
        assert loss == (ref_step_4 if n >= publish else ref_step_3), f"operation {n}: resumed loss differs"
        assert not any(p.name.startswith("step-") and p != expected and not _complete(p) for p in root.iterdir())


def _complete(path: Path) -> bool:
    try:
        verify_checkpoint(path)
        return True
    except CheckpointError:
        return False


def test_after_a_crash_the_next_save_completes_and_keeps_the_last_k(at_step_3, tmp_path):
    t, template, ops = at_step_3
    root = tmp_path / "root"
    shutil.copytree(template, root)
    fork = multiprocessing.get_context("fork")
    child = fork.Process(target=_save_and_die_at, args=(t, root, len(ops) // 2))
    child.start()
    child.join(120)
    assert child.exitcode == CRASH_EXIT
    assert t.save(root) == root / "step-00000003"
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step-00000002", "step-00000003"]
    assert resolve_checkpoint(root) == root / "step-00000003"


@pytest.mark.parametrize("kind", ["model", "optim"])
def test_a_flipped_byte_in_a_shard_file_is_detected_on_load_naming_the_file(at_step_3, tmp_path, kind, caplog):
    t, template, _ = at_step_3
    root = tmp_path / "root"
    shutil.copytree(template, root)
    corrupt = root / "step-00000002"
    victim = next(corrupt.glob(f"{kind}-*.safetensors"))
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0x01
    victim.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=victim.name):
        load_checkpoint(corrupt, ctx=t.ctx, model=t.model, optimizer=t.optimizer)
    with pytest.raises(CheckpointError, match=f"{victim}.*corrupt"):
        verify_checkpoint(corrupt)
    # Resuming from it (by name, or through the root's pointer) falls back to step 1, saying why.
    with caplog.at_level(logging.WARNING):
        assert resolve_checkpoint(corrupt) == root / "step-00000001"
        assert resolve_checkpoint(root) == root / "step-00000001"
    assert victim.name in caplog.text


def test_a_missing_recorded_checkpoint_falls_back_to_the_newest_complete(at_step_3, tmp_path, train_models):
    _, template, _ = at_step_3
    root = tmp_path / "root"
    shutil.copytree(template, root)
    shutil.rmtree(root / "step-00000002")
    fresh = train_cases.trainer(ParallelLayout(), train_models["llama"])
    assert fresh.load(root / "step-00000002") == 1 and fresh.checkpoint == root / "step-00000001"
    (root / "latest").write_text("{not json")
    assert resolve_checkpoint(root) == root / "step-00000001"
    shutil.rmtree(root / "step-00000001")
    with pytest.raises(FileNotFoundError, match="no complete checkpoint"):
        fresh.load(root)


def test_a_step_is_saved_once(at_step_3, tmp_path):
    t, template, _ = at_step_3
    root = tmp_path / "root"
    shutil.copytree(template, root)
    first = t.save(root)
    stamps = {p.name: os.stat(p).st_mtime_ns for p in first.iterdir()}
    inode = os.stat(first).st_ino
    assert t.save(root) == first
    assert os.stat(first).st_ino == inode and {p.name: os.stat(p).st_mtime_ns for p in first.iterdir()} == stamps
    # An incomplete step-3 (its manifest lost) is replaced by a complete one.
    (first / "manifest.json").unlink()
    assert t.save(root) == first and verify_checkpoint(first).step == 3


def test_a_run_resumed_from_an_older_checkpoint_supersedes_the_newer_ones(at_step_3, tmp_path, train_models):
    _, template, _ = at_step_3
    root = tmp_path / "root"
    shutil.copytree(template, root)
    fresh = train_cases.trainer(ParallelLayout(), train_models["llama"])
    fresh.config = fresh.config.model_copy(update={"keep_checkpoints": 2})
    assert fresh.load(root / "step-00000001") == 1
    train_cases.run_steps(fresh, 2)
    fresh.save(root)  # its step 3 supersedes nothing; step 2 is the other run's, identical, kept
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step-00000002", "step-00000003"]
    again = train_cases.trainer(ParallelLayout(), train_models["llama"])
    assert again.load(root / "step-00000002") == 2
    (root / "step-00000002" / "manifest.json").unlink()  # so that this run writes step 2 anew
    again.save(root)
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step-00000002"]
    assert resolve_checkpoint(root) == root / "step-00000002"


@pytest.mark.parametrize(("target", "expected"), [("manifest.json", 2), ("step-00000003", 3), ("latest", 3)])
def test_a_crash_of_rank_0_during_a_two_rank_save(train_models, reference, tmp_path, target, expected):
    """tp = 2: rank 0 dies right after the staging manifest, the publishing rename or the pointer move
    of step 3; the newest complete checkpoint resolves, verifies and resumes at tp = 1 (a reshard)."""
    layout = ParallelLayout(tp=2)
    with pytest.raises(Exception):
        run_ranks(train_cases.crash_at_main, 2, args=(layout, train_models["llama"], str(tmp_path), target))
    found = resolve_checkpoint(tmp_path)
    assert found == tmp_path / f"step-{expected:08d}"
    manifest = verify_checkpoint(found)
    assert manifest.layout == layout and sorted(manifest.sha256) == sorted(manifest.files) and len(manifest.files) == 4
    t = train_cases.trainer(ParallelLayout(), train_models["llama"])
    assert t.load(tmp_path) == expected
    assert abs(t.train_step()["loss"] - reference[1]["llama"]["metrics"][expected]["loss"]) <= LOSS_TOL
    if target == "latest":  # resharding reads every shard: a flipped byte in rank 1's file is caught
        victim = found / "optim-tp01-pp00.safetensors"
        data = bytearray(victim.read_bytes())
        data[-1] ^= 0x80
        victim.write_bytes(bytes(data))
        with pytest.raises(CheckpointError, match=victim.name):
            load_checkpoint(found, ctx=t.ctx, model=t.model, optimizer=t.optimizer)


def test_the_ranks_share_the_checks_and_agree_to_fall_back(train_models, tmp_path):
    """tp = 2 resume: rank r hashes files r, r + 2, ...; a flipped byte in a file only rank 1 checks
    makes both ranks fall back to step 2 together."""
    layout = ParallelLayout(tp=2)
    with pytest.raises(Exception):
        run_ranks(train_cases.crash_at_main, 2, args=(layout, train_models["llama"], str(tmp_path), "latest"))
    newest = tmp_path / "step-00000003"
    victim = newest / read_manifest(newest).files[1]
    data = bytearray(victim.read_bytes())
    data[len(data) // 3] ^= 0x04
    victim.write_bytes(bytes(data))
    by_rank = run_ranks(train_cases.load_main, 2, args=(layout, train_models["llama"], str(tmp_path)))
    assert by_rank == [(2, str(tmp_path / "step-00000002"))] * 2
