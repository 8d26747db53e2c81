"""DDP details of the tasks: the strategy for manual optimization, metrics over every process's share (2 gloo
processes). The DDP runs end to end: tests/test_sweep.py (each task, in one sweep) and tests/test_pipeline.py."""
import pytest
import pytorch_lightning as pl
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from pipelines.sync_batchnorm import trainer_arguments
from tasks.biggan.metrics import fid_is

NUM_FEATURES, NUM_CLASSES = 16, 10


class ManualOptimization(pl.LightningModule):
    def __init__(self):
        super().__init__()
        self.automatic_optimization = False


def test_manual_optimization_gets_ddp_that_finds_unused_parameters(compose_cfg):
    """BigGAN's D step reaches D only: plain DDP stops at the second step (parameters without a gradient)."""
    trainer_cfg = compose_cfg("trainer=ddp").trainer
    assert trainer_arguments(trainer_cfg, ManualOptimization())["strategy"] == "ddp_find_unused_parameters_true"
    assert trainer_arguments(trainer_cfg, pl.LightningModule())["strategy"] == "ddp"
    # strategy=auto: Lightning picks DDP for several devices or nodes, so the same applies
    for devices, nodes in ((2, 1), (-1, 1), ("auto", 1), (1, 2)):
        cpu = compose_cfg("trainer=cpu", f"trainer.devices={devices}", f"trainer.num_nodes={nodes}").trainer
        assert trainer_arguments(cpu, ManualOptimization())["strategy"] == "ddp_find_unused_parameters_true"
    one = compose_cfg("trainer=cpu").trainer
    assert trainer_arguments(one, ManualOptimization()).get("strategy", "auto") == "auto"


def feature_rows(seed: int, n: int = 64, shift: float = 0.0) -> torch.Tensor:
    return torch.randn(n, NUM_FEATURES + NUM_CLASSES, generator=torch.Generator().manual_seed(seed)) + shift


def fid_is_on_my_share(rank: int, world_size: int, rendezvous: str, results: dict) -> None:
    dist.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=rank, world_size=world_size)
    try:
        # interleaved shares, as BigGAN's real loader and Lightning's distributed sampler of the latents give them
        real, fake = feature_rows(0)[rank::world_size], feature_rows(1, shift=0.5)[rank::world_size]
        results[rank] = fid_is(real, fake, NUM_FEATURES, is_splits=1)
    finally:
        dist.destroy_process_group()


def test_biggan_fid_and_is_under_ddp_are_those_of_all_samples(tmp_path):
    with mp.Manager() as manager:
        results = manager.dict()
        mp.spawn(fid_is_on_my_share, args=(2, str(tmp_path / "rendezvous"), results), nprocs=2)
        per_rank = dict(results)
    whole = fid_is(feature_rows(0), feature_rows(1, shift=0.5), NUM_FEATURES, is_splits=1)
    half = fid_is(feature_rows(0)[::2], feature_rows(1, shift=0.5)[::2], NUM_FEATURES, is_splits=1)
    assert abs(half["fid"] - whole["fid"]) > 0.1  # one share alone would give another FID
    for rank in (0, 1):
        assert per_rank[rank]["fid"] == pytest.approx(whole["fid"], rel=1e-5)
        assert per_rank[rank]["is"] == pytest.approx(whole["is"], rel=1e-5)
