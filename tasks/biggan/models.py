"""BigGAN generator and projection discriminator (Brock et al., ICLR 2019), sized by ``resolution`` and ``ch``.

G: z is split into one chunk for the input linear and one per block; every block's conditional norm-acts take
cat(shared class embedding, its z chunk). Residual up-blocks (norm-act, upsample, conv3x3, norm-act, conv3x3;
shortcut upsample + conv1x1), self-attention after the block that reaches ``attention`` px, then the chosen layer
(unconditional, its own affine: BigGAN's output BN-ReLU) -> conv3x3 -> tanh.
D: residual down-blocks with pre-activation ReLU (none before the first), no norm, self-attention at ``attention``
px, ReLU, global sum pooling, linear + projection of the class embedding. Spectral norm in both, orthogonal init.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .layers import ConditionalNormAct, SelfAttention, orthogonal_sn, sn_conv, sn_linear

# channel multipliers of ch: G from the 4x4 input through each up-block; D through each down-block
# (the published BigGAN-PyTorch tables); D's "d" are the output widths of its blocks.
ARCHS = {
    32: {"g": (4, 4, 4, 4), "d": (4, 4, 4, 4), "d_down": (True, True, False, False)},
    64: {"g": (16, 16, 8, 4, 2), "d": (1, 2, 4, 8, 16), "d_down": (True, True, True, True, False)},
    128: {"g": (16, 16, 8, 4, 2, 1), "d": (1, 2, 4, 8, 16, 16), "d_down": (True, True, True, True, True, False)},
}


def arch_for(resolution: int, g_mults=None, d_mults=None) -> dict:
    """The published table for ``resolution``, with G's / D's channel multipliers replaced where given."""
    if resolution not in ARCHS:
        raise ValueError(f"no BigGAN architecture for {resolution} px; choose from {sorted(ARCHS)}")
    arch = dict(ARCHS[resolution])
    for key, mults in (("g", g_mults), ("d", d_mults)):
        if mults is not None:
            if len(mults) != len(arch[key]):
                raise ValueError(f"{key}_mults at {resolution} px needs {len(arch[key])} entries, got {list(mults)}")
            arch[key] = tuple(mults)
    return arch


def check_attention(attention: int | None, reached: list[int], key: str, resolution: int):
    """A self-attention resolution the blocks never reach would build no attention block: refuse it."""
    if attention and attention not in reached:  # null or 0: no attention (BigGAN-PyTorch's 0)
        raise ValueError(f"{key}={attention} is not a resolution this network's blocks reach at {resolution} px; "
                         f"choose from {sorted(set(reached))}, or null for no self-attention")


class GBlock(nn.Module):
    def __init__(self, in_ch: int, out_ch: int, norm_act, cond_dim: int, sn_eps: float):
        super().__init__()
        self.na1 = ConditionalNormAct(norm_act, in_ch, cond_dim, sn_eps)
        self.conv1 = sn_conv(in_ch, out_ch, 3, sn_eps)
        self.na2 = ConditionalNormAct(norm_act, out_ch, cond_dim, sn_eps)
        self.conv2 = sn_conv(out_ch, out_ch, 3, sn_eps)
        self.shortcut = sn_conv(in_ch, out_ch, 1, sn_eps)

    def forward(self, x: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        h = F.interpolate(self.na1(x, cond), scale_factor=2)
        h = self.conv2(self.na2(self.conv1(h), cond))
        return h + self.shortcut(F.interpolate(x, scale_factor=2))


class Generator(nn.Module):
    def __init__(self, norm_act, num_classes: int, resolution: int = 32, ch: int = 32, z_dim: int = 128,
                 shared_dim: int = 128, attention: int | None = None, mults=None, sn_eps: float = 1e-6,
                 shared_init_norm: float | None = None):
        super().__init__()
        mults = arch_for(resolution, g_mults=mults)["g"]
        widths = [m * ch for m in mults]
        self.num_classes, self.z_dim = num_classes, z_dim
        self.num_chunks = len(widths)  # input linear + one per up-block
        if z_dim % self.num_chunks:
            raise ValueError(f"z_dim={z_dim} must split evenly into {self.num_chunks} chunks at {resolution} px")
        chunk = z_dim // self.num_chunks
        self.shared = nn.Embedding(num_classes, shared_dim)
        nn.init.orthogonal_(self.shared.weight)  # every other weight: orthogonal_sn
        if shared_init_norm is not None:  # orthogonal class vectors of this norm (e.g. a z chunk's, sqrt(chunk))
            with torch.no_grad():
                self.shared.weight.mul_(shared_init_norm / self.shared.weight.norm(dim=1, keepdim=True))
        self.linear = sn_linear(chunk, widths[0] * 16, eps=sn_eps)
        sizes = [8 * 2 ** i for i in range(len(widths) - 1)]  # each up-block's output, from the 4x4 input
        check_attention(attention, sizes, "task.model.g_attention", resolution)
        self.blocks = nn.ModuleList()
        self.attention = nn.ModuleDict()
        for i, (cin, cout, size) in enumerate(zip(widths[:-1], widths[1:], sizes)):
            self.blocks.append(GBlock(cin, cout, norm_act, shared_dim + chunk, sn_eps))
            if size == attention:
                self.attention[str(i)] = SelfAttention(cout, sn_eps)
        self.out_norm_act = norm_act(widths[-1], apply_act=True)
        self.out_conv = sn_conv(widths[-1], 3, 3, sn_eps)

    def forward(self, z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        chunks = z.chunk(self.num_chunks, dim=1)
        shared = self.shared(y)
        h = self.linear(chunks[0]).view(z.shape[0], -1, 4, 4)
        for i, block in enumerate(self.blocks):
            h = block(h, torch.cat([shared, chunks[i + 1]], dim=1))
            if str(i) in self.attention:
                h = self.attention[str(i)](h)
        return torch.tanh(self.out_conv(self.out_norm_act(h)))


class DBlock(nn.Module):
    def __init__(self, in_ch: int, out_ch: int, downsample: bool, preactivation: bool, sn_eps: float):
        super().__init__()
        self.downsample, self.preactivation = downsample, preactivation
        self.conv1 = sn_conv(in_ch, out_ch, 3, sn_eps)
        self.conv2 = sn_conv(out_ch, out_ch, 3, sn_eps)
        self.shortcut = sn_conv(in_ch, out_ch, 1, sn_eps) if in_ch != out_ch or downsample else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(x) if self.preactivation else x
        h = self.conv2(F.relu(self.conv1(h)))
        if self.downsample:
            h = F.avg_pool2d(h, 2)
        s = x
        if self.shortcut is not None:  # BigGAN: conv before pooling after preactivated blocks, after it first
            s = self.shortcut(s) if self.preactivation else s
            s = F.avg_pool2d(s, 2) if self.downsample else s
            s = s if self.preactivation else self.shortcut(s)
        return h + s


class Discriminator(nn.Module):
    def __init__(self, num_classes: int, resolution: int = 32, ch: int = 32, attention: int | None = None,
                 mults=None, sn_eps: float = 1e-6):
        super().__init__()
        arch = arch_for(resolution, d_mults=mults)
        widths = [3] + [m * ch for m in arch["d"]]
        self.blocks = nn.ModuleList()
        self.attention = nn.ModuleDict()  # after the block that leaves ``attention`` px, once
        sizes = [resolution // 2 ** sum(arch["d_down"][:i + 1]) for i in range(len(arch["d_down"]))]
        check_attention(attention, sizes, "task.model.d_attention", resolution)
        for i, (cin, cout, down, size) in enumerate(zip(widths[:-1], widths[1:], arch["d_down"], sizes)):
            self.blocks.append(DBlock(cin, cout, down, preactivation=i > 0, sn_eps=sn_eps))
            if size == attention and not self.attention:
                self.attention[str(i)] = SelfAttention(cout, sn_eps)
        self.linear = sn_linear(widths[-1], 1, eps=sn_eps)
        self.embed = orthogonal_sn(nn.Embedding(num_classes, widths[-1]), sn_eps)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        h = x
        for i, block in enumerate(self.blocks):
            h = block(h)
            if str(i) in self.attention:
                h = self.attention[str(i)](h)
        h = F.relu(h).sum(dim=(2, 3))
        return self.linear(h).squeeze(1) + (self.embed(y) * h).sum(dim=1)
