"""Train-sampler sizing shared by the step-based tasks."""
from __future__ import annotations


def draws_for_all_ranks(datamodule, per_rank: int) -> int:
    """Samples a train sampler must yield so that every process draws ``per_rank`` of them: under DDP Lightning
    wraps the sampler and splits its indices over the processes (``trainer.world_size``; 1 without a trainer)."""
    trainer = datamodule.trainer
    return per_rank * (trainer.world_size if trainer is not None else 1)
