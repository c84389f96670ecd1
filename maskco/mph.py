"""The Mask Prediction Head (DESIGN 4.4) on C5: a residual Transformer with sine positions (``attn``) or two
Bottleneck blocks (``conv``); both start as the identity, so the trunk starts as MoCo's.

``maskco.model.Encoder`` picks one by ``mph``; it is dropped at transfer time.
"""
import math

import torch
from torch import nn
from torchvision.models.resnet import Bottleneck


def sine_position_embedding(height: int, width: int, dim: int, device=None, dtype=torch.float32) -> torch.Tensor:
    """DETR's 2D sine positions (normalize=True, scale 2*pi) -> ``[H*W, dim]``, row-major like ``flatten(2)``.

    The first ``dim / 2`` channels encode y, the rest x; each half interleaves sin and cos over geometric
    frequencies. Normalising the coordinates to (0, 2*pi] makes a 4x4 map (96-128 px) and a 14x14 map
    (dilated, 224 px) span the same phase range, so the MPH sees comparable positions at every size.
    https://github.com/facebookresearch/detr/blob/main/models/position_encoding.py
    """
    if dim % 4 != 0:
        raise ValueError(f"dim must be divisible by 4 for 2D sine positions, got {dim}")
    half = dim // 2
    y = torch.arange(1, height + 1, device=device, dtype=torch.float32) / (height + 1e-6) * 2 * math.pi  # [H]
    x = torch.arange(1, width + 1, device=device, dtype=torch.float32) / (width + 1e-6) * 2 * math.pi  # [W]
    freq = 10000.0 ** (2 * (torch.arange(half, device=device) // 2) / half)  # [half]
    pos_y = y[:, None] / freq  # [H, half]
    pos_x = x[:, None] / freq  # [W, half]
    pos_y = torch.stack((pos_y[:, 0::2].sin(), pos_y[:, 1::2].cos()), dim=2).flatten(1)  # [H, half]
    pos_x = torch.stack((pos_x[:, 0::2].sin(), pos_x[:, 1::2].cos()), dim=2).flatten(1)  # [W, half]
    pos = torch.cat((pos_y[:, None].expand(-1, width, -1), pos_x[None].expand(height, -1, -1)), dim=2)  # [H, W, dim]
    return pos.flatten(0, 1).to(dtype)  # [H*W, dim]


class AttentionMPH(nn.Module):
    """Residual Transformer MPH: ``x + expand(encoder(reduce(x) + pos))`` on the C5 tokens.

    Pre-norm layers (``norm_first=True``) plus a final LayerNorm: pre-norm keeps an identity path through
    every layer, so it trains with SGD at MoCo's learning rate without the learning-rate warm-up that
    post-norm Transformers need, and it matches ViT/MAE. Positions are added once to the input tokens
    (ViT-style) rather than to q/k of every layer (DETR), which lets us use ``nn.TransformerEncoderLayer``
    and its fused attention. No dropout (self-supervised pretraining, as MoCo). ``expand`` is
    zero-initialised, so at initialisation the MPH is exactly the identity and the trunk starts as MoCo's.
    """

    def __init__(self, channels: int, width: int, layers: int, heads: int):
        super().__init__()
        if width % heads != 0 or width % 4 != 0:
            raise ValueError(f"mph_width ({width}) must be divisible by mph_heads ({heads}) and by 4")
        self.reduce = nn.Conv2d(channels, width, 1)
        layer = nn.TransformerEncoderLayer(width, heads, 4 * width, dropout=0.0, activation="gelu",
                                           batch_first=True, norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, layers, norm=nn.LayerNorm(width), enable_nested_tensor=False)
        self.expand = nn.Conv2d(width, channels, 1)
        nn.init.zeros_(self.expand.weight)
        nn.init.zeros_(self.expand.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, _, h, w = x.shape  # x: [N, C, H, W]
        t = self.reduce(x).flatten(2).transpose(1, 2)  # [N, H*W, D]; a free view when x is channels_last
        t = t + sine_position_embedding(h, w, t.shape[-1], t.device, t.dtype)  # [N, H*W, D]
        t = self.encoder(t)  # [N, H*W, D]
        return x + self.expand(t.transpose(1, 2).reshape(n, -1, h, w))  # [N, C, H, W]


def conv_mph(channels: int) -> nn.Sequential:
    """Two torchvision Bottleneck blocks at C5 width; the last BN of each starts at gamma 0 (identity at init)."""
    blocks = [Bottleneck(channels, channels // Bottleneck.expansion) for _ in range(2)]
    for block in blocks:
        nn.init.zeros_(block.bn3.weight)
    return nn.Sequential(*blocks)
