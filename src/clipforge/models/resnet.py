"""The modified ResNet image tower of Radford et al. (2021).

Three changes from a torchvision ResNet: a stem of three 3x3 convolutions followed by an average pool (instead
of one 7x7 convolution and a max pool); anti-aliased downsampling, where every stride-2 step is an average pool
placed before a stride-1 convolution; and a final attention pooling whose single query is the mean of the
feature map. Parameter names are OpenAI's (`conv1`/`bn1`…, `layerN.M`, `downsample.0`/`.1`, `attnpool.*`) so
their checkpoints load one-to-one. Note that the downsample branch is a Sequential whose average pool is named
"-1", so its convolution and BatchNorm carry the indices 0 and 1 in state dicts, exactly as in OpenAI's files.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import nn

from .config import VisionConfig

EXPANSION = 4  # a bottleneck's output has 4x the channels of its inner convolutions


class Bottleneck(nn.Module):
    """1x1 -> 3x3 -> (avgpool if strided) -> 1x1, with a residual branch that pools before projecting."""

    def __init__(self, in_channels: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        out_channels = planes * EXPANSION
        self.conv1 = nn.Conv2d(in_channels, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        # The stride is applied by pooling, not by the convolution: an anti-aliased downsampling.
        self.avgpool = nn.AvgPool2d(stride) if stride > 1 else nn.Identity()
        self.conv3 = nn.Conv2d(planes, out_channels, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_channels)
        self.downsample: nn.Sequential | None = None
        if stride > 1 or in_channels != out_channels:
            self.downsample = nn.Sequential(
                OrderedDict(
                    [
                        ("-1", nn.AvgPool2d(stride) if stride > 1 else nn.Identity()),
                        ("0", nn.Conv2d(in_channels, out_channels, 1, bias=False)),
                        ("1", nn.BatchNorm2d(out_channels)),
                    ]
                )
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(self.avgpool(out)))
        identity = self.downsample(x) if self.downsample is not None else x
        return F.relu(out + identity)


class AttentionPool2d(nn.Module):
    """Multi-head attention from one query (the spatial mean, plus its position) over all positions."""

    def __init__(self, grid: int, width: int, heads: int, output_dim: int) -> None:
        super().__init__()
        if width % heads:
            raise ValueError(f"attention pooling width {width} is not divisible by heads {heads}")
        self.heads = heads
        self.positional_embedding = nn.Parameter(torch.empty(grid * grid + 1, width))
        nn.init.normal_(self.positional_embedding, std=width**-0.5)
        self.k_proj = nn.Linear(width, width)
        self.q_proj = nn.Linear(width, width)
        self.v_proj = nn.Linear(width, width)
        self.c_proj = nn.Linear(width, output_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, width = x.shape[:2]
        x = x.flatten(2).transpose(1, 2)  # [B, HW, C]
        x = torch.cat([x.mean(dim=1, keepdim=True), x], dim=1)  # [B, HW+1, C]
        x = x + self.positional_embedding.to(x.dtype)
        head_dim = width // self.heads

        def split(t: torch.Tensor) -> torch.Tensor:
            return t.view(batch, -1, self.heads, head_dim).transpose(1, 2)  # [B, H, L, C/H]

        q = split(self.q_proj(x[:, :1]))  # the pooled token is the only query: [B, H, 1, C/H]
        k, v = split(self.k_proj(x)), split(self.v_proj(x))  # [B, H, HW+1, C/H]
        out = F.scaled_dot_product_attention(q, k, v)  # [B, H, 1, C/H]
        out = out.transpose(1, 2).reshape(batch, width)  # [B, C]
        return self.c_proj(out)  # [B, D]


class ModifiedResNet(nn.Module):
    """Stem, four bottleneck stages (strides 1, 2, 2, 2), attention pooling to `output_dim`."""

    def __init__(self, cfg: VisionConfig, output_dim: int) -> None:
        super().__init__()
        if not isinstance(cfg.layers, tuple) or len(cfg.layers) != 4:
            raise ValueError(f"a modified ResNet needs four stage depths, got layers={cfg.layers!r}")
        width = cfg.width
        self.image_size = cfg.image_size
        self.conv1 = nn.Conv2d(3, width // 2, kernel_size=3, stride=2, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width // 2)
        self.conv2 = nn.Conv2d(width // 2, width // 2, kernel_size=3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(width // 2)
        self.conv3 = nn.Conv2d(width // 2, width, kernel_size=3, padding=1, bias=False)
        self.bn3 = nn.BatchNorm2d(width)
        self.avgpool = nn.AvgPool2d(2)
        in_channels = width
        for index, (depth, stride) in enumerate(zip(cfg.layers, (1, 2, 2, 2))):
            planes = width * 2**index
            blocks = [Bottleneck(in_channels, planes, stride)]
            in_channels = planes * EXPANSION
            blocks += [Bottleneck(in_channels, planes) for _ in range(1, depth)]
            self.add_module(f"layer{index + 1}", nn.Sequential(*blocks))
        # The stem halves the resolution twice and stages 2-4 three more times: a total stride of 32.
        self.attnpool = AttentionPool2d(cfg.image_size // 32, in_channels, cfg.num_heads, output_dim)
        self.init_weights()

    @property
    def stages(self) -> list[nn.Sequential]:
        return [self.layer1, self.layer2, self.layer3, self.layer4]

    def init_weights(self) -> None:
        """OpenAI's scheme: attention pooling with std C^-1/2, and each block's last BatchNorm scaled to zero
        so every residual block starts as the identity."""
        std = self.attnpool.c_proj.in_features**-0.5
        for proj in (self.attnpool.q_proj, self.attnpool.k_proj, self.attnpool.v_proj, self.attnpool.c_proj):
            nn.init.normal_(proj.weight, std=std)
        for stage in self.stages:
            for block in stage:
                nn.init.zeros_(block.bn3.weight)

    def stem(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))  # [B, W/2, H/2, W/2]
        x = F.relu(self.bn2(self.conv2(x)))
        x = F.relu(self.bn3(self.conv3(x)))  # [B, W, H/2, W/2]
        return self.avgpool(x)  # [B, W, H/4, W/4]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.conv1.weight.dtype)
        if self.conv1.weight.is_contiguous(memory_format=torch.channels_last):
            # Weights stored channels-last (see `use_channels_last`): feed activations the same way, so that
            # oneDNN/cuDNN run their fast NHWC kernels without a layout change at every convolution.
            x = x.contiguous(memory_format=torch.channels_last)
        x = self.stem(x)
        for stage in self.stages:
            x = stage(x)  # [B, 32W, H/32, W/32] after the last stage
        return self.attnpool(x)  # [B, D]


def use_channels_last(module: nn.Module) -> nn.Module:
    """Store every convolution of a ResNet tower channels-last (NHWC): about 1.5x faster training on CPU."""
    for sub in module.modules():
        if isinstance(sub, nn.Conv2d):
            sub.to(memory_format=torch.channels_last)
    return module
