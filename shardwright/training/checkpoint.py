"""Sharded training checkpoints: atomic, complete-or-absent, resumable bit-exactly.

    ROOT/step-00000010/model-tp00-pp01.safetensors   parameters of shard (tp 0, pp 1), local names
    ROOT/step-00000010/optim-tp00-pp01.safetensors   its AdamW state: exp_avg.*, exp_avg_sq.*, step.*
    ROOT/step-00000010/manifest.json                 layout, model spec, step, data position, RNG

Writing (`save_checkpoint`, collective): every rank writes into ROOT/.partial-step-N/ (the DP
rank 0 of each shard writes that shard: the DP replicas are identical), each file to a temporary
name, fsync'd, then renamed. After all ranks are done (an all-gather of their RNG states doubles
as the barrier), rank 0 writes the manifest the same way and renames the directory to
ROOT/step-N. A checkpoint is therefore either absent or complete: a crash at any point leaves at
worst a `.partial-*` directory, which `latest_checkpoint` ignores and the next save replaces.
Ranks must see the same ROOT (one node, or a shared file system).

Loading (`load_checkpoint`) at the saved (tp, pp) reads the shard's own files (any dp): the
continuation is bit-exact. At another (tp, pp) it reshards through the Hugging Face layout
(`training.reshard`).
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from pydantic import Field
from safetensors.torch import load_file, save_file

from shardwright.config import ModelSpec, ParallelLayout, StrictModel
from shardwright.parallel.context import ParallelContext

MANIFEST = "manifest.json"
FORMAT_VERSION = 1


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
    ranks: list[RankState] = Field(description="Per-rank RNG states, by rank.")
    created_unix_s: float = Field(description="When the manifest was written.")


def step_dir_name(step: int) -> str:
    return f"step-{step:08d}"


def shard_files(tp_rank: int, pp_rank: int) -> tuple[str, str]:
    """(model file, optimizer file) names of shard (tp_rank, pp_rank)."""
    tag = f"tp{tp_rank:02d}-pp{pp_rank:02d}"
    return f"model-{tag}.safetensors", f"optim-{tag}.safetensors"


def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """`write(tmp)` to a temporary name beside `path`, fsync it, rename it to `path`, fsync the dir."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    write(tmp)
    _fsync_path(tmp)
    os.replace(tmp, path)
    _fsync_path(path.parent)


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
                    data_state: dict[str, int], tokenizer_dir: str | None = None) -> Path:
    """Write ROOT/step-N atomically (collective over the world); returns its path on every rank."""
    root = Path(root)
    staging, final = root / f".partial-{step_dir_name(step)}", root / step_dir_name(step)
    if ctx.rank == 0:
        shutil.rmtree(staging, ignore_errors=True)  # left by an earlier crash
        staging.mkdir(parents=True)
    _barrier(ctx)
    if ctx.dp_rank == 0 and ctx.cp_rank == 0:
        _write_shard(staging, ctx, model, optimizer)
    ranks = _gather(ctx, RankState(rank=ctx.rank, rng=_rng_state()).model_dump())
    if ctx.rank == 0:
        files = [f for t in range(ctx.tp) for p in range(ctx.pp) for f in shard_files(t, p)]
        manifest = Manifest(step=step, layout=ctx.layout, model=spec, data=data_state,
                            tokenizer_dir=tokenizer_dir, files=files, ranks=ranks, created_unix_s=time.time())
        write_manifest(staging, manifest)
        _publish(staging, final)
    _barrier(ctx)
    return final


def _write_shard(directory: Path, ctx: ParallelContext, model: torch.nn.Module,
                 optimizer: torch.optim.Optimizer) -> None:
    model_file, optim_file = shard_files(ctx.tp_rank, ctx.pp_rank)
    params = {n: p.detach().contiguous() for n, p in model.named_parameters()}
    atomic_write(directory / model_file, lambda tmp: save_file(params, str(tmp)))
    state = optimizer_tensors(model, optimizer)
    atomic_write(directory / optim_file, lambda tmp: save_file(state, str(tmp)))


def write_manifest(directory: Path, manifest: Manifest) -> None:
    text = json.dumps(manifest.model_dump(mode="json"), indent=1)
    atomic_write(directory / MANIFEST, lambda tmp: tmp.write_text(text))


def _publish(staging: Path, final: Path) -> None:
    """Rename the finished staging directory to its final name (replacing an older copy)."""
    if final.exists():
        old = final.with_name(f".old-{final.name}")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
        os.replace(staging, final)
        shutil.rmtree(old)
    else:
        os.replace(staging, final)
    _fsync_path(final.parent)


def read_manifest(checkpoint: str | Path) -> Manifest:
    """The manifest of a complete checkpoint directory."""
    path = Path(checkpoint) / MANIFEST
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: {checkpoint} is not a complete checkpoint "
                                "(use latest_checkpoint(root) to find the newest complete one)")
    return Manifest.model_validate(json.loads(path.read_text()))


def latest_checkpoint(root: str | Path) -> Path | None:
    """The complete checkpoint under `root` with the highest step (None when there is none)."""
    best: tuple[int, Path] | None = None
    for d in Path(root).glob("step-*"):
        try:
            manifest = read_manifest(d)
        except (OSError, ValueError):
            continue
        if all((d / f).is_file() for f in manifest.files) and (best is None or manifest.step > best[0]):
            best = (manifest.step, d)
    return best[1] if best else None


def load_checkpoint(checkpoint: str | Path, *, ctx: ParallelContext, model: torch.nn.Module,
                    optimizer: torch.optim.Optimizer) -> Manifest:
    """Fill `model` and `optimizer` from `checkpoint` (at any layout); returns its manifest."""
    manifest = read_manifest(checkpoint)
    if (manifest.layout.tp, manifest.layout.pp) != (ctx.tp, ctx.pp):
        from shardwright.training.reshard import load_resharded

        load_resharded(Path(checkpoint), manifest, model=model, optimizer=optimizer)
        return manifest
    model_file, optim_file = shard_files(ctx.tp_rank, ctx.pp_rank)
    params = load_file(str(Path(checkpoint) / model_file))
    with torch.no_grad():
        for name, param in model.named_parameters():
            param.copy_(params[name])
    load_optimizer_tensors(model, optimizer, load_file(str(Path(checkpoint) / optim_file)))
    return manifest
