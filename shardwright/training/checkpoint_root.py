"""The directory of a job's training checkpoints: crash-safe publishing, a `latest` pointer,
verification by sha256, fallback to the newest complete checkpoint, pruning to the last K.

    ROOT/step-00000010/       a complete checkpoint (see training.checkpoint), published once
    ROOT/step-00000020/
    ROOT/latest               {"checkpoint": "step-00000020", "step": 20}: the last one published
    ROOT/.partial-step-N/     a save in progress (or one that crashed): never read
    ROOT/.pruned-step-N/      a checkpoint being deleted: never read

Invariants, whatever operation a crash interrupts:
- a `step-N` directory is complete: it only ever appears by renaming a finished staging directory
  (its files written, fsync'd, hashed into the manifest), and it is never renamed away while it
  is complete (a step already saved is not saved again; an incomplete or corrupt `step-N` is
  moved aside before its replacement is renamed in);
- the checkpoint to resume from is the newest complete one by step (verified: every file's
  sha256 matches the manifest); a new one therefore counts from the instant its rename lands.
  `latest` (for operators and tools) moves after that (write, fsync, rename, fsync of ROOT): it
  names the last published checkpoint unless a crash came between the two renames, which
  resolution notices and logs;
- a save of step N deletes checkpoints of steps above N (a run resumed from an older checkpoint
  supersedes the run that wrote them), so the newest complete one is always this run's;
- pruning first renames an old checkpoint to `.pruned-*` (one atomic step), then deletes it.

Every filesystem change of a save goes through `write_file`, `fsync_path`, `rename` and
`remove_tree` (the crash tests interpose on exactly these).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
from collections.abc import Callable, Iterable
from pathlib import Path

from shardwright.config import CHECKPOINT_MANIFEST

log = logging.getLogger(__name__)

MANIFEST = CHECKPOINT_MANIFEST
POINTER = "latest"
_STEP_DIR = re.compile(r"step-(\d{8})")


class CheckpointError(ValueError):
    """A checkpoint directory is incomplete or one of its files does not match the manifest."""


def step_dir_name(step: int) -> str:
    return f"step-{step:08d}"


def step_of(directory: Path) -> int | None:
    """N of a `step-N` directory name (None for any other name)."""
    match = _STEP_DIR.fullmatch(directory.name)
    return int(match.group(1)) if match else None


# ---- the filesystem operations of a save
def write_file(path: Path, write: Callable[[Path], None]) -> None:
    """`write(path)`: create `path` with its whole content (a staging or temporary name)."""
    write(path)


def fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def rename(src: Path, dst: Path) -> None:
    os.replace(src, dst)


def remove_tree(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)


def atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """`write(tmp)` to a temporary name beside `path`, fsync it, rename it to `path`, fsync the dir."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    write_file(tmp, write)
    fsync_path(tmp)
    rename(tmp, path)
    fsync_path(path.parent)


# ---- verification
def sha256_file(path: Path, chunk_bytes: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk_bytes):
            digest.update(block)
    return digest.hexdigest()


def verify_files(directory: Path, sha256: dict[str, str] | None, names: Iterable[str]) -> None:
    """Raise CheckpointError naming the first of `names` that is missing or differs from `sha256`
    (None: presence only, for checkpoints written before hashes were recorded)."""
    for name in names:
        path = directory / name
        if not path.is_file():
            raise CheckpointError(f"{path} is missing: {directory} is not a complete checkpoint")
        if sha256 is None:
            continue
        want = sha256.get(name)
        if want is None:
            raise CheckpointError(f"{path} has no sha256 in {directory / MANIFEST}: the manifest is corrupt")
        got = sha256_file(path)
        if got != want:
            raise CheckpointError(f"{path} is corrupt: its sha256 is {got[:16]}…, the manifest records "
                                  f"{want[:16]}…; resume from another checkpoint (the newest complete one "
                                  "is found by resolve_checkpoint(ROOT))")


# ---- the pointer
def write_pointer(root: Path, checkpoint: Path, step: int) -> None:
    """Move ROOT/latest to `checkpoint` atomically."""
    text = json.dumps({"checkpoint": checkpoint.name, "step": step})
    atomic_write(root / POINTER, lambda tmp: tmp.write_text(text))


def read_pointer(root: Path) -> Path | None:
    """The directory ROOT/latest names (None when it is absent or unreadable)."""
    try:
        name = json.loads((root / POINTER).read_text())["checkpoint"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return root / name if isinstance(name, str) and step_of(Path(name)) is not None else None


# ---- finding the checkpoint to resume from
def step_dirs(root: Path) -> list[Path]:
    """The `step-N` directories under `root`, highest step first."""
    found = [d for d in root.glob("step-*") if step_of(d) is not None and d.is_dir()]
    return sorted(found, key=lambda d: step_of(d), reverse=True)


def newest_complete(root: Path, verify: Callable[[Path], object], *, skip: Path | None = None) -> Path | None:
    """The `step-N` under `root` with the highest N that passes `verify` (raises CheckpointError)."""
    for d in step_dirs(root):
        if d == skip:
            continue
        try:
            verify(d)
        except (OSError, CheckpointError) as err:
            log.warning("skipping checkpoint %s: %s", d, err)
            continue
        return d
    return None


def resolve(path: Path, verify: Callable[[Path], object]) -> Path | None:
    """The checkpoint to resume from, given a checkpoint directory or a root (see resolve_checkpoint)."""
    named = step_of(path) is not None or (path / MANIFEST).exists()
    if named:
        try:
            verify(path)
            return path
        except (OSError, CheckpointError) as err:
            log.warning("checkpoint %s cannot be used (%s); falling back to the newest complete one in %s",
                        path, err, path.parent)
        return from_root(path.parent, verify, skip=path)
    return from_root(path, verify)


def from_root(root: Path, verify: Callable[[Path], object], skip: Path | None = None) -> Path | None:
    """The newest complete checkpoint under `root` (not `skip`); a disagreeing ROOT/latest is logged."""
    found = newest_complete(root, verify, skip=skip)
    pointed = read_pointer(root)
    if pointed is not None and found is not None and pointed != found:
        log.warning("%s names %s, but the newest complete checkpoint is %s (a crash between publishing "
                    "and moving the pointer, or a lost checkpoint): resuming from %s",
                    root / POINTER, pointed.name, found.name, found.name)
    return found


# ---- publishing and pruning
def publish(staging: Path, final: Path) -> None:
    """Rename the finished `staging` to `final`; an incomplete `final` is moved aside first."""
    if final.exists():
        broken = final.with_name(f".pruned-{final.name}")
        remove_tree(broken)
        rename(final, broken)
    rename(staging, final)
    fsync_path(final.parent)


def prune(root: Path, keep: int, current: Path) -> list[Path]:
    """Delete all but `current` and the `keep` - 1 newest below it; returns those deleted.

    Checkpoints of higher steps than `current` are deleted too: the run that wrote them was
    superseded by this one, resumed from an older checkpoint (they would otherwise be the newest
    and be resumed from). Leftovers of crashed saves and prunes are removed.
    """
    top = step_of(current)
    dirs = [d for d in step_dirs(root) if d != current]
    doomed = [d for d in dirs if step_of(d) > top] + [d for d in dirs if step_of(d) < top][max(keep - 1, 0):]
    for d in doomed:
        gone = root / f".pruned-{d.name}"
        remove_tree(gone)
        rename(d, gone)
    if doomed:
        fsync_path(root)
    for leftover in sorted(root.glob(".pruned-*")) + sorted(root.glob(".partial-*")):
        remove_tree(leftover)
    for tmp in root.glob(f".{POINTER}.tmp-*"):  # a pointer write that crashed
        tmp.unlink(missing_ok=True)
    return doomed
