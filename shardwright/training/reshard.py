"""From a sharded training checkpoint to the Hugging Face layout and back, at any layout.

`gather_hf` assembles the unsharded Hugging Face tensors of the parameters (or of an AdamW
moment, which has the parameters' shapes) from every shard file, using each saved shard's
`weight_plan` (via `sharding.param_pieces` on a meta-device model of the saved layout).
`export_hf` writes them as a Hugging Face directory that `shardwright.models.load_model` and
`transformers` load. `load_resharded` writes them to a temporary Hugging Face directory and
reads this rank's slices with the ordinary slice-wise loader, so a checkpoint saved at one
(tp, pp) continues at another: parameters and both moments move, the step count is shared.
Peak memory is the unsharded model (one tensor kind at a time) plus the shard files read.
`served_model_dir`/`ensure_served_model_dir`: a deployment may name a training checkpoint; it is
served from its export beside it (`step-N.hf`), written once, on the deployment's first start.
"""

from __future__ import annotations

import itertools

import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file

from shardwright.config import SERVED_EXPORT_SUFFIX, ModelSpec
from shardwright.models.checkpoint import CheckpointReader
from shardwright.models.checkpoint import save_checkpoint as save_hf_checkpoint
from shardwright.models.decoder import DecoderModel
from shardwright.models.random_init import hf_config_from_spec
from shardwright.models.tokenizer import write_default_chat_template
from shardwright.models.weights import load_weights, weight_plan
from shardwright.training.checkpoint import (MANIFEST, Manifest, latest_checkpoint, read_manifest, shard_files,
                                             verify_checkpoint)
from shardwright.training.sharding import FullTensors, param_pieces, stage_model

MOMENTS = ("exp_avg", "exp_avg_sq")


def gather_hf(checkpoint: Path, manifest: Manifest, kind: str = "param") -> dict[str, torch.Tensor]:
    """Unsharded HF-named tensors of `kind`: 'param', 'exp_avg' or 'exp_avg_sq' ({} if not saved)."""
    if kind not in ("param", *MOMENTS):
        raise ValueError(f"kind={kind!r}; choose 'param', 'exp_avg' or 'exp_avg_sq'")
    layout, full = manifest.layout, FullTensors()
    for tp_rank, pp_rank, ep_rank in itertools.product(range(layout.tp), range(layout.pp), range(layout.ep)):
        model_file, optim_file = shard_files(tp_rank, pp_rank, ep_rank)
        saved = load_file(str(checkpoint / (model_file if kind == "param" else optim_file)))
        meta = stage_model(manifest.model, layout, tp_rank, pp_rank, ep_rank)
        for name, _, pieces in param_pieces(meta):
            key = name if kind == "param" else f"{kind}.{name}"
            for piece in pieces if key in saved else []:
                full.add(piece, saved[key])
    return full.build()


def export_hf(checkpoint: str | Path, out_dir: str | Path) -> Path:
    """Write checkpoint's model as a Hugging Face directory: config.json, model.safetensors, the
    tokenizer's tokenizer.json and tokenizer_config.json when the run had them, and the default
    chat template when it had none."""
    checkpoint, out_dir = Path(checkpoint), Path(out_dir)
    manifest = read_manifest(checkpoint)
    tensors = gather_hf(checkpoint, manifest)
    save_hf_checkpoint(out_dir, tensors, hf_config_from_spec(manifest.model))
    for name in ("tokenizer.json", "tokenizer_config.json"):
        if manifest.tokenizer_dir and (Path(manifest.tokenizer_dir) / name).is_file():
            shutil.copy2(Path(manifest.tokenizer_dir) / name, out_dir / name)
    write_default_chat_template(out_dir)
    return out_dir


def _local_slices(model: DecoderModel, directory: Path) -> dict[str, torch.Tensor]:
    """This rank's slice of every parameter-shaped tensor in the HF directory, by local name."""
    with CheckpointReader(directory) as reader:
        return {name: torch.cat([reader.read(r) for r in reads], dim=0) if len(reads) > 1
                else reader.read(reads[0]) for name, _, reads in weight_plan(model, reader)}


def _saved_step(checkpoint: Path) -> torch.Tensor | None:
    """AdamW's step count (the same for every parameter), None when no state was saved."""
    saved = load_file(str(checkpoint / shard_files(0, 0)[1]))
    steps = [v for k, v in saved.items() if k.startswith("step.")]
    return steps[0] if steps else None


def load_resharded(checkpoint: Path, manifest: Manifest, *, model: DecoderModel,
                   optimizer: torch.optim.Optimizer) -> None:
    """Fill this rank's `model` and its AdamW state from a checkpoint of another layout."""
    config = hf_config_from_spec(manifest.model)
    moments: dict[str, dict[str, torch.Tensor]] = {}
    with tempfile.TemporaryDirectory(prefix="shardwright-reshard-") as tmp:
        save_hf_checkpoint(Path(tmp) / "param", gather_hf(checkpoint, manifest), config)
        with CheckpointReader(Path(tmp) / "param") as reader:
            load_weights(model, reader)
        for kind in MOMENTS:
            tensors = gather_hf(checkpoint, manifest, kind)
            if tensors:
                save_hf_checkpoint(Path(tmp) / kind, tensors, config)
                moments[kind] = _local_slices(model, Path(tmp) / kind)
    step = _saved_step(checkpoint)
    if step is None or not moments:
        return
    for name, param in model.named_parameters():
        state = {kind: moments[kind][name].to(param.device).contiguous() for kind in MOMENTS}
        optimizer.state[param] = {"step": step.clone(), **state}


def served_model_dir(path: str | Path) -> Path:
    """The Hugging Face directory a deployment of `path` serves: `path` itself when it holds
    config.json; for a training checkpoint (a step-N folder, or a run's checkpoint folder: its newest
    complete checkpoint, chosen now) the export beside it, `step-N.hf`, which `ensure_served_model_dir`
    writes once. ValueError when `path` is neither."""
    path = Path(path)
    if (path / "config.json").is_file():
        return path
    checkpoint = path if (path / MANIFEST).is_file() else latest_checkpoint(path)
    if checkpoint is None:
        raise ValueError(f"model: {path} is neither a Hugging Face model directory (no config.json) nor a "
                         f"training checkpoint (no complete {MANIFEST} in it or in a step-N folder below it)")
    return checkpoint.parent / f"{checkpoint.name}{SERVED_EXPORT_SUFFIX}"


def served_model_spec(path: str | Path) -> ModelSpec | None:
    """The model a deployment of `path` (a `served_model_dir`) will serve, without exporting it."""
    path = Path(path)
    if (path / "config.json").is_file():
        return ModelSpec.from_hf_dir(path)
    checkpoint = _checkpoint_of_export(path)
    return read_manifest(checkpoint).model if checkpoint is not None else None


def ensure_served_model_dir(path: str | Path) -> Path:
    """`path` (a `served_model_dir`), its export written first if it is a checkpoint's and missing.
    Written into a staging folder and renamed into place, so a reader never sees half an export (two
    writers at once: the first rename wins, the other's copy is dropped)."""
    path = Path(path)
    if (path / "config.json").is_file():
        return path
    checkpoint = _checkpoint_of_export(path)
    if checkpoint is None:
        raise ValueError(f"model: {path} is not a Hugging Face model directory, and no training checkpoint "
                         f"{path.name.removesuffix(SERVED_EXPORT_SUFFIX)} is beside it to export from")
    verify_checkpoint(checkpoint)
    staging = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        export_hf(checkpoint, staging)
        try:
            os.rename(staging, path)
        except OSError:
            if not (path / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return path


def _checkpoint_of_export(path: Path) -> Path | None:
    if not path.name.endswith(SERVED_EXPORT_SUFFIX):
        return None
    checkpoint = path.with_name(path.name.removesuffix(SERVED_EXPORT_SUFFIX))
    return checkpoint if (checkpoint / MANIFEST).is_file() else None
