"""BiSeNet face parsing (facexlib's ``parsing_bisenet.pth``, 19 CelebAMask-HQ labels), written from its
layout so the file loads with a strict key match and ``torch.load(weights_only=True)``.

A ResNet-18 context path (features at 1/8, 1/16, 1/32), attention refinement of the 1/16 and 1/32 features
plus a global-average context, fused with the 1/8 features; the main head's logits are upsampled
(bilinear, align_corners) to the input size. Only the main head is needed for labels; the two auxiliary
heads exist so the file's keys all have a home. Widths come from the file's shapes.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..checkpoints import load_torch_file
from ..errors import CheckpointError


class ConvBNReLU(nn.Module):
    def __init__(self, cin: int, cout: int, kernel: int = 3):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel, 1, kernel // 2, bias=False)
        self.bn = nn.BatchNorm2d(cout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.bn(self.conv(x)))


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.downsample = None
        if cin != cout or stride != 1:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        residual = self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))
        shortcut = x if self.downsample is None else self.downsample(x)
        return F.relu(shortcut + residual)


class ResNet18(nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        widths = [width, width, width * 2, width * 4, width * 8]
        for i in range(1, 5):
            stride = 1 if i == 1 else 2
            blocks = [BasicBlock(widths[i - 1], widths[i], stride), BasicBlock(widths[i], widths[i])]
            setattr(self, f"layer{i}", nn.Sequential(*blocks))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        x = F.max_pool2d(F.relu(self.bn1(self.conv1(x))), 3, 2, 1)
        feat8 = self.layer2(self.layer1(x))
        feat16 = self.layer3(feat8)
        return feat8, feat16, self.layer4(feat16)


class AttentionRefinement(nn.Module):
    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.conv = ConvBNReLU(cin, cout)
        self.conv_atten = nn.Conv2d(cout, cout, 1, bias=False)
        self.bn_atten = nn.BatchNorm2d(cout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        feat = self.conv(x)
        atten = torch.sigmoid(self.bn_atten(self.conv_atten(F.avg_pool2d(feat, feat.shape[2:]))))
        return feat * atten


class ContextPath(nn.Module):
    def __init__(self, width: int, context: int):
        super().__init__()
        self.resnet = ResNet18(width)
        self.arm16 = AttentionRefinement(width * 4, context)
        self.arm32 = AttentionRefinement(width * 8, context)
        self.conv_head32 = ConvBNReLU(context, context)
        self.conv_head16 = ConvBNReLU(context, context)
        self.conv_avg = ConvBNReLU(width * 8, context, kernel=1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        feat8, feat16, feat32 = self.resnet(x)
        avg = self.conv_avg(F.avg_pool2d(feat32, feat32.shape[2:]))
        up32 = self.arm32(feat32) + F.interpolate(avg, feat32.shape[2:], mode="nearest")
        up32 = self.conv_head32(F.interpolate(up32, feat16.shape[2:], mode="nearest"))
        up16 = self.arm16(feat16) + up32
        up16 = self.conv_head16(F.interpolate(up16, feat8.shape[2:], mode="nearest"))
        return feat8, up16, up32


class FeatureFusion(nn.Module):
    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.convblk = ConvBNReLU(cin, cout, kernel=1)
        self.conv1 = nn.Conv2d(cout, cout // 4, 1, bias=False)
        self.conv2 = nn.Conv2d(cout // 4, cout, 1, bias=False)

    def forward(self, spatial: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        feat = self.convblk(torch.cat([spatial, context], dim=1))
        atten = torch.sigmoid(self.conv2(F.relu(self.conv1(F.avg_pool2d(feat, feat.shape[2:])))))
        return feat * atten + feat


class Head(nn.Module):
    def __init__(self, cin: int, mid: int, classes: int):
        super().__init__()
        self.conv = ConvBNReLU(cin, mid)
        self.conv_out = nn.Conv2d(mid, classes, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv_out(self.conv(x))


class BiSeNet(nn.Module):
    """``forward(x [N, 3, H, W], ImageNet-normalised) -> label logits [N, classes, H, W]`` (main head)."""

    def __init__(
        self, width: int = 64, context: int = 128, fuse: int = 256, aux: int = 64, classes: int = 19
    ):
        super().__init__()
        self.cp = ContextPath(width, context)
        self.ffm = FeatureFusion(width * 2 + context, fuse)
        self.conv_out = Head(fuse, fuse, classes)
        self.conv_out16 = Head(context, aux, classes)
        self.conv_out32 = Head(context, aux, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        feat8, context8, _ = self.cp(x)
        out = self.conv_out(self.ffm(feat8, context8))
        return F.interpolate(out, x.shape[2:], mode="bilinear", align_corners=True)

    @classmethod
    def from_state_dict(cls, sd: dict[str, torch.Tensor]) -> BiSeNet:
        try:
            config = {
                "width": sd["cp.resnet.conv1.weight"].shape[0],
                "context": sd["cp.arm16.conv.conv.weight"].shape[0],
                "fuse": sd["ffm.convblk.conv.weight"].shape[0],
                "aux": sd["conv_out16.conv.conv.weight"].shape[0],
                "classes": sd["conv_out.conv_out.weight"].shape[0],
            }
        except KeyError as exc:
            raise CheckpointError(f"not a facexlib BiSeNet parsing file (no {exc.args[0]}).") from exc
        model = cls(**config)
        try:
            model.load_state_dict(sd, strict=True)
        except RuntimeError as exc:
            raise CheckpointError(f"not a facexlib BiSeNet parsing file: {str(exc).splitlines()[0]}") from exc
        return model.eval()


def load_bisenet(path: str | os.PathLike) -> BiSeNet:
    """facexlib's ``parsing_bisenet.pth`` from the user's disk (``weights_only=True``)."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise CheckpointError(f"--face-parser {path}: no such file (facexlib's parsing_bisenet.pth).")
    try:
        sd = load_torch_file(str(path))
    except Exception as exc:  # noqa: BLE001 - any unreadable file is the user's input error
        raise CheckpointError(f"--face-parser {path}: cannot read it ({exc}).") from exc
    if not isinstance(sd, dict):
        raise CheckpointError(f"--face-parser {path}: the file holds no state dict.")
    return BiSeNet.from_state_dict(sd)
