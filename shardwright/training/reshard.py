"""From a sharded training checkpoint to the Hugging Face layout and back, at any layout.

`gather_hf` assembles the unsharded Hugging Face tensors of the parameters (or of an AdamW
moment, which has the parameters' shapes) from every shard file, using each saved shard's
`weight_plan` (via `sharding.param_pieces` on a meta-device model of the saved layout).
`export_hf` writes them as a Hugging Face directory that `shardwright.models.load_model` and
`transformers` load. `load_resharded` writes them to a temporary Hugging Face directory and
reads this rank's slices with the ordinary slice-wise loader, so a checkpoint saved at one
(tp, pp) continues at another: parameters and both moments move, the step count is shared.
Peak memory is the unsharded model (one tensor kind at a time) plus the shard files read.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file

from shardwright.models.checkpoint import CheckpointReader
from shardwright.models.checkpoint import save_checkpoint as save_hf_checkpoint
from shardwright.models.decoder import DecoderModel
from shardwright.models.random_init import hf_config_from_spec
from shardwright.models.tokenizer import write_default_chat_template
from shardwright.models.weights import load_weights, weight_plan
from shardwright.training.checkpoint import Manifest, read_manifest, shard_files
from shardwright.training.sharding import FullTensors, param_pieces, stage_model

MOMENTS = ("exp_avg", "exp_avg_sq")


def gather_hf(checkpoint: Path, manifest: Manifest, kind: str = "param") -> dict[str, torch.Tensor]:
    """Unsharded HF-named tensors of `kind`: 'param', 'exp_avg' or 'exp_avg_sq' ({} if not saved)."""
    if kind not in ("param", *MOMENTS):
        raise ValueError(f"kind={kind!r}; choose 'param', 'exp_avg' or 'exp_avg_sq'")
    layout, full = manifest.layout, FullTensors()
    for tp_rank in range(layout.tp):
        for pp_rank in range(layout.pp):
            model_file, optim_file = shard_files(tp_rank, pp_rank)
            saved = load_file(str(checkpoint / (model_file if kind == "param" else optim_file)))
            meta = stage_model(manifest.model, layout, tp_rank, pp_rank)
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
