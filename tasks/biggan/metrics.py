"""FID and IS (torchmetrics) over precomputed feature rows, so that each image passes the network once.

The feature network gives rows [pooled features | logits]; torchmetrics' FrechetInceptionDistance and
InceptionScore get ``feature=`` modules that select their columns. Real features are computed once per real set.
"""
from __future__ import annotations

import torch
from torch import nn
from torchmetrics.image.fid import FrechetInceptionDistance
from torchmetrics.image.inception import InceptionScore


class Columns(nn.Module):
    """The ``feature`` module torchmetrics gets: columns [start, stop) of precomputed feature rows."""

    def __init__(self, start: int, stop: int):
        super().__init__()
        self.start, self.stop = start, stop
        self.num_features = stop - start  # torchmetrics reads this instead of probing with a dummy image

    def forward(self, rows: torch.Tensor) -> torch.Tensor:
        return rows[:, self.start:self.stop]


def fid_is(real_rows: torch.Tensor, fake_rows: torch.Tensor, num_features: int,
           is_splits: int = 10) -> dict[str, float]:
    """FID between the two sets of rows, and the IS (mean, std over splits) of the fake rows' logits."""
    fid = FrechetInceptionDistance(feature=Columns(0, num_features)).to(fake_rows.device)
    fid.update(real_rows, real=True)
    fid.update(fake_rows, real=False)
    inception = InceptionScore(feature=Columns(num_features, fake_rows.shape[1]), splits=is_splits)
    inception = inception.to(fake_rows.device)
    inception.update(fake_rows)
    is_mean, is_std = inception.compute()
    return {"fid": float(fid.compute()), "is": float(is_mean), "is_std": float(is_std)}
