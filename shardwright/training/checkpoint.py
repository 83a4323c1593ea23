"""Sharded training checkpoints: complete-or-absent, verified, resumable bit-exactly.

    ROOT/step-00000010/model-tp00-pp01.safetensors   parameters of shard (tp 0, pp 1), local names
    ROOT/step-00000010/optim-tp00-pp01.safetensors   its AdamW state: exp_avg.*, exp_avg_sq.*, step.*
    ROOT/step-00000010/manifest.json                 layout, model spec, step, data position, RNG,
                                                     the sha256 of every shard file:
        {"format_version": 2, "step": 10, "files": ["model-tp00-pp00.safetensors", ...],
         "sha256": {"model-tp00-pp00.safetensors": "5f0c…", ...}, "layout": {...}, ...}
    ROOT/latest                                      the last checkpoint published

Writing (`save_checkpoint`, collective): every rank writes into ROOT/.partial-step-N/ (the DP
rank 0 of each shard writes that shard: the DP replicas are identical), each file to a temporary
name, fsync'd, hashed, then renamed. After all ranks are done (an all-gather of their RNG states
and hashes doubles as the barrier), rank 0 writes the manifest the same way, renames the directory
to ROOT/step-N, moves ROOT/latest to it and prunes all but the last `keep` checkpoints
(training.checkpoint_root states what holds after a crash at any of these operations). A step
whose complete checkpoint already exists is not written again.

Resuming (`resolve_checkpoint`): the named checkpoint if it verifies, else (missing, incomplete or
corrupt) the newest complete one beside it; given a root, the newest complete one under it.

Loading (`load_checkpoint`) checks the sha256 of every file it reads (an error names the file).
At the saved (tp, pp) it reads the shard's own files (any dp): the continuation is bit-exact. At
another (tp, pp) it reshards through the Hugging Face layout (`training.reshard`).
"""

from __future__ import annotations

import base64
import json
import logging
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from pydantic import Field
from safetensors.torch import load_file, save_file

from shardwright.config import ModelSpec, ParallelLayout, StrictModel
from shardwright.parallel.context import ParallelContext
from shardwright.training import checkpoint_root as fs
from shardwright.training.checkpoint_root import MANIFEST, CheckpointError, atomic_write, step_dir_name

log = logging.getLogger(__name__)

FORMAT_VERSION = 2  # 2: sha256 of every file in the manifest
DEFAULT_KEEP = 3

__all__ = ["CheckpointError", "Manifest", "choose_checkpoint", "latest_checkpoint", "load_checkpoint", "read_manifest",
           "resolve_checkpoint", "save_checkpoint", "shard_files", "step_dir_name", "verify_checkpoint"]


class RankState(StrictModel):
    """Per-rank state recorded in the manifest."""

    rank: int = Field(ge=0, description="Global rank.")
    rng: dict[str, str] = Field(description="RNG states, base64 of torch's ByteTensors ('cpu', 'cuda:i').")


class Manifest(StrictModel):
    """The description of a complete checkpoint (written last)."""

    format_version: int = Field(FORMAT_VERSION, description="Checkpoint format version.")
    step: int = Field(ge=0, description="Optimizer steps taken.")
    layout: ParallelLayout = Field(description="Layout the shards were written at.")
    model: ModelSpec = Field(description="Shape of the unsharded model.")
    data: dict[str, int] = Field(description="Data loader position (PackedLoader.state_dict()).")
    tokenizer_dir: str | None = Field(None, description="Directory whose tokenizer.json the model uses.")
    files: list[str] = Field(description="Every shard file of the checkpoint.")
    sha256: dict[str, str] = Field(default_factory=dict,
                                   description="Hex sha256 of every file in `files` (format 2 on).")
    ranks: list[RankState] = Field(description="Per-rank RNG states, by rank.")
    created_unix_s: float = Field(description="When the manifest was written.")


def shard_files(tp_rank: int, pp_rank: int, ep_rank: int = 0) -> tuple[str, str]:
    """(model file, optimizer file) names of shard (tp_rank, pp_rank, ep_rank); EP rank 0's keep the
    names of a layout without expert parallelism (each EP rank's file holds its experts and its
    copy of the replicated rest)."""
    tag = f"tp{tp_rank:02d}-pp{pp_rank:02d}" + (f"-ep{ep_rank:02d}" if ep_rank else "")
    return f"model-{tag}.safetensors", f"optim-{tag}.safetensors"


def optimizer_tensors(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    """AdamW state by local parameter name: exp_avg.NAME, exp_avg_sq.NAME, step.NAME."""
    out = {}
    for name, param in model.named_parameters():
        for key, value in optimizer.state.get(param, {}).items():
            out[f"{key}.{name}"] = value.detach().contiguous()
    return out


def load_optimizer_tensors(model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                           tensors: dict[str, torch.Tensor]) -> None:
    """Inverse of `optimizer_tensors` (copies, so the values are bitwise those saved)."""
    for name, param in model.named_parameters():
        state = {k: tensors[f"{k}.{name}"].clone().to(param.device)
                 for k in ("step", "exp_avg", "exp_avg_sq") if f"{k}.{name}" in tensors}
        if state:
            optimizer.state[param] = state


def _rng_state() -> dict[str, str]:
    states = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        states.update({f"cuda:{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())})
    return {k: base64.b64encode(v.numpy().tobytes()).decode() for k, v in states.items()}


def restore_rng(manifest: Manifest, rank: int) -> None:
    """Set this rank's torch RNG states to those saved (when the checkpoint has this rank)."""
    saved = {r.rank: r.rng for r in manifest.ranks}.get(rank)
    for key, b64 in (saved or {}).items():
        state = torch.frombuffer(bytearray(base64.b64decode(b64)), dtype=torch.uint8)
        if key == "cpu":
            torch.set_rng_state(state)
        elif torch.cuda.is_available():
            torch.cuda.set_rng_state(state, int(key.split(":")[1]))


def _collective(ctx: ParallelContext) -> bool:
    return dist.is_initialized() and ctx.world_size > 1


def _gather(ctx: ParallelContext, value: Any) -> list[Any]:
    if not _collective(ctx):
        return [value]
    out: list[Any] = [None] * ctx.world_size
    dist.all_gather_object(out, value)
    return out


def _barrier(ctx: ParallelContext) -> None:
    if _collective(ctx):
        dist.barrier()


def save_checkpoint(root: str | Path, *, ctx: ParallelContext, model: torch.nn.Module,
                    optimizer: torch.optim.Optimizer, step: int, spec: ModelSpec,
                    data_state: dict[str, int], tokenizer_dir: str | None = None,
                    keep: int = DEFAULT_KEEP) -> Path:
    """Publish ROOT/step-N (collective over the world), keep the last `keep`; its path on every rank.

    When a complete, verified ROOT/step-N exists already (a run resumed from an earlier
    checkpoint reaches the same step with the same state), nothing is written but the pointer.
    """
    root = Path(root)
    staging, final = root / f".partial-{step_dir_name(step)}", root / step_dir_name(step)
    exists = _complete(final) if ctx.rank == 0 else None
    if not _gather(ctx, exists)[0]:
        _write_checkpoint(staging, ctx=ctx, model=model, optimizer=optimizer, step=step, spec=spec,
                          data_state=data_state, tokenizer_dir=tokenizer_dir)
        if ctx.rank == 0:
            fs.publish(staging, final)
    else:
        log.info("checkpoint %s exists and verifies: step %d is not saved again", final, step)
    if ctx.rank == 0:
        fs.write_pointer(root, final, step)
        fs.prune(root, keep, final)
    _barrier(ctx)
    return final


def _write_checkpoint(staging: Path, *, ctx: ParallelContext, model: torch.nn.Module,
                      optimizer: torch.optim.Optimizer, step: int, spec: ModelSpec,
                      data_state: dict[str, int], tokenizer_dir: str | None) -> None:
    """Every shard file, then (rank 0) the manifest, into `staging`."""
    if ctx.rank == 0:
        fs.remove_tree(staging)  # left by an earlier crash
        staging.mkdir(parents=True)
    _barrier(ctx)
    hashes = _write_shard(staging, ctx, model, optimizer) if ctx.dp_rank == 0 and ctx.cp_rank == 0 else {}
    gathered = _gather(ctx, (RankState(rank=ctx.rank, rng=_rng_state()).model_dump(), hashes))
    if ctx.rank == 0:
        files = [f for t in range(ctx.tp) for p in range(ctx.pp) for e in range(ctx.ep) for f in shard_files(t, p, e)]
        sha256 = {name: digest for _, h in gathered for name, digest in h.items()}
        manifest = Manifest(step=step, layout=ctx.layout, model=spec, data=data_state,
                            tokenizer_dir=tokenizer_dir, files=files, sha256=sha256,
                            ranks=[r for r, _ in gathered], created_unix_s=time.time())
        write_manifest(staging, manifest)


def _write_shard(directory: Path, ctx: ParallelContext, model: torch.nn.Module,
                 optimizer: torch.optim.Optimizer) -> dict[str, str]:
    """This shard's model and optimizer files; their sha256 by file name."""
    model_file, optim_file = shard_files(ctx.tp_rank, ctx.pp_rank, ctx.ep_rank)
    params = {n: p.detach().contiguous() for n, p in model.named_parameters()}
    state = optimizer_tensors(model, optimizer)
    hashes = {}
    for name, tensors in ((model_file, params), (optim_file, state)):
        atomic_write(directory / name, lambda tmp, t=tensors: save_file(t, str(tmp)))
        hashes[name] = fs.sha256_file(directory / name)
    return hashes


def write_manifest(directory: Path, manifest: Manifest) -> None:
    text = json.dumps(manifest.model_dump(mode="json"), indent=1)
    atomic_write(directory / MANIFEST, lambda tmp: tmp.write_text(text))


def read_manifest(checkpoint: str | Path) -> Manifest:
    """The manifest of a complete checkpoint directory."""
    path = Path(checkpoint) / MANIFEST
    if not path.is_file():
        raise CheckpointError(f"{path} is missing: {checkpoint} is not a complete checkpoint "
                              "(resolve_checkpoint(root) finds the newest complete one)")
    try:
        return Manifest.model_validate(json.loads(path.read_text()))
    except ValueError as err:
        raise CheckpointError(f"{path} is corrupt ({type(err).__name__}): {checkpoint} cannot be loaded; "
                              "resolve_checkpoint(root) finds the newest complete one") from err


def verify_checkpoint(checkpoint: str | Path, files: list[str] | None = None) -> Manifest:
    """The manifest, once every file (or those of `files`) matches its sha256; else CheckpointError."""
    checkpoint = Path(checkpoint)
    manifest = read_manifest(checkpoint)
    names = manifest.files if files is None else files
    # format 1 recorded no hashes: its files are only checked to be there
    fs.verify_files(checkpoint, manifest.sha256 if manifest.format_version >= 2 else None, names)
    return manifest


def _complete(checkpoint: Path) -> bool:
    try:
        verify_checkpoint(checkpoint)
        return True
    except (OSError, CheckpointError):
        return False


def resolve_checkpoint(path: str | Path) -> Path | None:
    """The checkpoint to resume from: `path` itself when it is a checkpoint that verifies; else, for
    a missing, incomplete or corrupt checkpoint or for a root, the newest complete one by step in
    its root (None when there is none). Fallbacks are logged.
    """
    return fs.resolve(Path(path), verify_checkpoint)


def choose_checkpoint(path: str | Path, *, ctx: ParallelContext) -> Path | None:
    """`resolve_checkpoint` as a collective: every rank gets the same answer, and the hashing is shared
    (rank r checks files r, r + world_size, ... of a candidate, so each file is read once). A
    candidate that fails on any rank is logged (naming the file) and the next one is tried.
    """
    rejected: set[Path] = set()
    while True:
        candidate = fs.resolve(Path(path), lambda d: _intact(d, rejected)) if ctx.rank == 0 else None
        candidate = _gather(ctx, candidate)[0]
        if candidate is None:
            return None
        try:
            files = read_manifest(candidate).files
            verify_checkpoint(candidate, files[ctx.rank::ctx.world_size])
            error = None
        except (OSError, CheckpointError) as err:
            error = str(err)
        errors = [e for e in _gather(ctx, error) if e]
        if not errors:
            return candidate
        log.warning("checkpoint %s cannot be used (%s); trying the next newest", candidate, "; ".join(errors))
        rejected.add(candidate)


def _intact(checkpoint: Path, rejected: set[Path]) -> None:
    """A cheap completeness check (manifest, every file present); CheckpointError if not, or if rejected."""
    if checkpoint in rejected:
        raise CheckpointError(f"{checkpoint} failed its sha256 check")
    manifest = read_manifest(checkpoint)
    fs.verify_files(checkpoint, None, manifest.files)


def latest_checkpoint(root: str | Path) -> Path | None:
    """The newest complete (verified) checkpoint under `root`; None when there is none."""
    return fs.from_root(Path(root), verify_checkpoint)


def load_checkpoint(checkpoint: str | Path, *, ctx: ParallelContext, model: torch.nn.Module,
                    optimizer: torch.optim.Optimizer, verify: bool = True) -> Manifest:
    """Fill `model` and `optimizer` from `checkpoint` (at any layout); returns its manifest.

    Every file read is first checked against the manifest's sha256 (CheckpointError names it);
    `verify=False` skips that for a checkpoint `choose_checkpoint` has just verified.
    """
    checkpoint = Path(checkpoint)
    manifest = read_manifest(checkpoint)
    if (manifest.layout.tp, manifest.layout.pp, manifest.layout.ep) != (ctx.tp, ctx.pp, ctx.ep):
        from shardwright.training.reshard import load_resharded

        if verify:
            verify_checkpoint(checkpoint)  # resharding reads every shard
        load_resharded(checkpoint, manifest, model=model, optimizer=optimizer)
        return manifest
    model_file, optim_file = shard_files(ctx.tp_rank, ctx.pp_rank, ctx.ep_rank)
    if verify:
        verify_checkpoint(checkpoint, [model_file, optim_file])
    params = load_file(str(checkpoint / model_file))
    with torch.no_grad():
        for name, param in model.named_parameters():
            param.copy_(params[name])
    load_optimizer_tensors(model, optimizer, load_file(str(checkpoint / optim_file)))
    return manifest
