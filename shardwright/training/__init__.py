"""The pure-torch training core used by actors/TrainingController.

One `TrainerRank` per rank of a job's torch.distributed world: tensor x pipeline (GPipe / 1F1B)
x data parallelism, AdamW with global-norm clipping and a warm-up + cosine schedule, a packed
corpus loader, atomic sharded checkpoints that resume bit-exactly, reshard to another layout and
export to a Hugging Face directory. Like `models/` and `parallel/`, nothing here imports Ray,
gRPC or Redis; a Ray actor holds one `TrainerRank` and calls its phases and `train_step()`.

    trainer = TrainerRank(config, layout).start(ModelSource(path="hf_dir"))
    metrics = trainer.train_step()          # {"loss": ..., "grad_norm": ..., "tokens_per_s": ...}
    trainer.save("ckpts")                   # ckpts/step-00000001/ (collective)
"""
