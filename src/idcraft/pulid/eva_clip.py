"""The EVA02-CLIP vision tower PuLID reads faces with (EVA02-CLIP-L-14-336), written from its config.

EVA02 is a ViT with a class token and absolute position embedding, plus: 2-D rotary position embedding on
the patch tokens' queries and keys (interleaved pairs, frequencies interpolated from a 16x16 pre-training
grid to the actual grid), separate q/k/v projections with q and v biases, a LayerNorm on the attention
output before its projection and on the SwiGLU hidden ("sub-LN"), LayerNorm eps 1e-6. The output is the
final-normed class token through ``head``; PuLID also takes the hidden states entering blocks 4, 8, 12,
16 and 20.

The parameter names are those under ``visual.`` in eva_clip's checkpoints (``EVA02_CLIP_L_336_psz14_s6B.pt``),
so the file loads with a strict key match; every width comes from the tensors' shapes. Settings that
shapes cannot tell (rotary grid, head width) come from a config JSON in eva_clip's own format beside the
checkpoint (``embed_dim`` + ``vision_cfg``), else the official EVA02-CLIP-L-14-336 values.
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..checkpoints import load_torch_file
from ..errors import CheckpointError
from .preprocess import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

StateDict = dict[str, torch.Tensor]
#: Blocks whose INPUT PuLID reads (official ``0 < idx <= 20 and idx % 4 == 0``).
HIDDEN_BLOCKS = (4, 8, 12, 16, 20)


@dataclass(frozen=True)
class EvaVisionConfig:
    """The vision tower's settings (eva_clip ``vision_cfg`` names); defaults = EVA02-CLIP-L-14-336."""

    image_size: int = 336
    patch_size: int = 14
    width: int = 1024
    layers: int = 24
    head_width: int = 64
    mlp_hidden: int = 2730  # int(width * mlp_ratio), read from the file
    embed_dim: int = 768
    pt_hw_seq_len: int = 16
    intp_freq: bool = True

    @property
    def heads(self) -> int:
        return self.width // self.head_width

    @property
    def grid(self) -> int:
        return self.image_size // self.patch_size

    @classmethod
    def from_json(cls, path: str | os.PathLike) -> EvaVisionConfig:
        """eva_clip's model config (``{"embed_dim": ..., "vision_cfg": {...}}``), EVA02 options only."""
        try:
            data = json.loads(Path(path).read_text())
            vision = data["vision_cfg"]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise CheckpointError(f"{path}: not an eva_clip model config with vision_cfg ({exc}).") from exc
        unsupported = [k for k in ("naiveswiglu", "subln", "rope") if not vision.get(k, False)] + [
            k for k in ("postnorm", "global_average_pool", "ls_init_value") if vision.get(k)
        ]
        if unsupported or not vision.get("qkv_bias", True):
            raise CheckpointError(
                f"{path}: idcraft's EVA tower is EVA02 (rope, SwiGLU, sub-LN, qkv bias, class-token output); "
                f"this config differs in {unsupported or ['qkv_bias']}."
            )
        width = int(vision.get("width", 768))
        return cls(
            image_size=int(vision.get("image_size", 224)),
            patch_size=int(vision.get("patch_size", 16)),
            width=width,
            layers=int(vision.get("layers", 12)),
            head_width=int(vision.get("head_width", 64)),
            mlp_hidden=int(width * float(vision.get("mlp_ratio", 4.0))),
            embed_dim=int(data.get("embed_dim", 768)),
            pt_hw_seq_len=int(vision.get("pt_hw_seq_len", 16)),
            intp_freq=bool(vision.get("intp_freq", False)),
        )

    def to_json(self) -> dict:
        """This config in eva_clip's format (to write beside a checkpoint)."""
        vision = asdict(self)
        embed_dim = vision.pop("embed_dim")
        vision["mlp_ratio"] = vision.pop("mlp_hidden") / self.width
        vision.update(eva_model_name="eva-clip", rope=True, naiveswiglu=True, subln=True, qkv_bias=True)
        return {"embed_dim": embed_dim, "vision_cfg": vision}

    def with_shapes(self, sd: StateDict) -> EvaVisionConfig:
        """This config with every width the state dict's shapes give (the file decides)."""
        try:
            width, _, patch, _ = sd["patch_embed.proj.weight"].shape
            tokens = sd["pos_embed"].shape[1]
            embed_dim = sd["head.weight"].shape[0]
            mlp_hidden = sd["blocks.0.mlp.w1.weight"].shape[0]
            layers = 1 + max(int(m.group(1)) for k in sd if (m := re.match(r"blocks\.(\d+)\.", k)))
        except (KeyError, ValueError) as exc:
            raise CheckpointError(f"not an EVA02-CLIP vision tower (missing {exc}).") from exc
        grid = math.isqrt(tokens - 1)
        if grid * grid != tokens - 1:
            raise CheckpointError(f"EVA pos_embed has {tokens} tokens: not a class token + a square grid.")
        if width % self.head_width:
            raise CheckpointError(f"EVA width {width} is not a multiple of the head width {self.head_width}.")
        values = asdict(self) | {
            "image_size": grid * patch,
            "patch_size": patch,
            "width": width,
            "layers": layers,
            "mlp_hidden": mlp_hidden,
            "embed_dim": embed_dim,
        }
        return EvaVisionConfig(**values)


def _rotate_pairs(x: torch.Tensor) -> torch.Tensor:
    """(x0, x1, x2, x3, ...) -> (-x1, x0, -x3, x2, ...): rotation of interleaved pairs."""
    pairs = x.unflatten(-1, (-1, 2))
    return torch.stack((-pairs[..., 1], pairs[..., 0]), dim=-1).flatten(-2)


def rotary_tables(config: EvaVisionConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin ``[grid*grid, head_width]``: half the head rotates with the row, half with the column."""
    dim = config.head_width // 2
    freqs = 1.0 / (10000 ** (torch.arange(0, dim, 2)[: dim // 2].float() / dim))
    length = config.grid if config.intp_freq else config.pt_hw_seq_len
    positions = torch.arange(length) / length * config.pt_hw_seq_len
    angles = torch.einsum("i,f->if", positions, freqs).repeat_interleave(2, dim=-1)  # [grid, dim]
    rows = angles[:, None, :].expand(length, length, dim)
    cols = angles[None, :, :].expand(length, length, dim)
    table = torch.cat((rows, cols), dim=-1).reshape(length * length, 2 * dim)
    return table.cos(), table.sin()


class EvaAttention(nn.Module):
    def __init__(self, config: EvaVisionConfig):
        super().__init__()
        width = config.width
        self.heads = config.heads
        self.q_proj = nn.Linear(width, width, bias=False)
        self.k_proj = nn.Linear(width, width, bias=False)
        self.v_proj = nn.Linear(width, width, bias=False)
        self.q_bias = nn.Parameter(torch.zeros(width))
        self.v_bias = nn.Parameter(torch.zeros(width))
        self.inner_attn_ln = nn.LayerNorm(width, eps=1e-6)
        self.proj = nn.Linear(width, width)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        batch, length, width = x.shape

        def heads(t: torch.Tensor) -> torch.Tensor:
            return t.reshape(batch, length, self.heads, -1).transpose(1, 2)

        q = heads(F.linear(x, self.q_proj.weight, self.q_bias))
        k = heads(self.k_proj(x))
        v = heads(F.linear(x, self.v_proj.weight, self.v_bias))
        # rotary position on the patch tokens only (the class token has no position)
        q = torch.cat((q[:, :, :1], q[:, :, 1:] * cos + _rotate_pairs(q[:, :, 1:]) * sin), dim=2).type_as(v)
        k = torch.cat((k[:, :, :1], k[:, :, 1:] * cos + _rotate_pairs(k[:, :, 1:]) * sin), dim=2).type_as(v)
        out = F.scaled_dot_product_attention(q, k, v)
        out = out.transpose(1, 2).reshape(batch, length, width)
        return self.proj(self.inner_attn_ln(out))


class SwiGLU(nn.Module):
    def __init__(self, width: int, hidden: int):
        super().__init__()
        self.w1 = nn.Linear(width, hidden)
        self.w2 = nn.Linear(width, hidden)
        self.ffn_ln = nn.LayerNorm(hidden, eps=1e-6)
        self.w3 = nn.Linear(hidden, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w3(self.ffn_ln(F.silu(self.w1(x)) * self.w2(x)))


class EvaBlock(nn.Module):
    def __init__(self, config: EvaVisionConfig):
        super().__init__()
        self.norm1 = nn.LayerNorm(config.width, eps=1e-6)
        self.attn = EvaAttention(config)
        self.norm2 = nn.LayerNorm(config.width, eps=1e-6)
        self.mlp = SwiGLU(config.width, config.mlp_hidden)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), cos, sin)
        return x + self.mlp(self.norm2(x))


class PatchEmbed(nn.Module):
    def __init__(self, config: EvaVisionConfig):
        super().__init__()
        self.proj = nn.Conv2d(3, config.width, kernel_size=config.patch_size, stride=config.patch_size)


class EvaVisionTower(nn.Module):
    """``forward(images [N, 3, S, S], CLIP-normalised) -> (class output [N, embed_dim], hidden states)``."""

    image_mean = OPENAI_CLIP_MEAN
    image_std = OPENAI_CLIP_STD

    def __init__(self, config: EvaVisionConfig = EvaVisionConfig()):
        super().__init__()
        self.config = config
        self.image_size = config.image_size
        self.patch_embed = PatchEmbed(config)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, config.width))
        self.pos_embed = nn.Parameter(torch.zeros(1, config.grid**2 + 1, config.width))
        self.blocks = nn.ModuleList(EvaBlock(config) for _ in range(config.layers))
        self.norm = nn.LayerNorm(config.width, eps=1e-6)
        self.head = nn.Linear(config.width, config.embed_dim)
        cos, sin = rotary_tables(config)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        size = self.config.image_size
        if images.shape[-2:] != (size, size):
            raise ValueError(f"the EVA tower reads {size}x{size} images, got {tuple(images.shape[-2:])}.")
        x = self.patch_embed.proj(images).flatten(2).transpose(1, 2)
        x = torch.cat((self.cls_token.expand(x.shape[0], -1, -1).to(x.dtype), x), dim=1) + self.pos_embed
        cos, sin = self.rope_cos.to(x.dtype), self.rope_sin.to(x.dtype)
        hidden = []
        for index, block in enumerate(self.blocks):
            if index in HIDDEN_BLOCKS:
                hidden.append(x)
            x = block(x, cos, sin)
        return self.head(self.norm(x)[:, 0]), hidden

    @classmethod
    def from_state_dict(cls, sd: StateDict, config: EvaVisionConfig | None = None) -> EvaVisionTower:
        """A tower shaped like ``sd`` (the ``visual.`` part, prefix removed), loaded with a strict key match
        (eva_clip's saved rotary tables, if any, are recomputed rather than read)."""
        sd = {k: v for k, v in sd.items() if not re.search(r"(^|\.)rope\.freqs_(cos|sin)$", k)}
        config = (config or EvaVisionConfig()).with_shapes(sd)
        model = cls(config)
        model = model.to(next(iter(sd.values())).dtype)
        try:
            missing, unexpected = model.load_state_dict(sd, strict=False)
        except RuntimeError as exc:
            raise CheckpointError(f"EVA tower tensors are inconsistent with each other: {exc}") from exc
        if missing or unexpected:
            raise CheckpointError(
                f"not an EVA02-CLIP vision tower: missing {sorted(missing)[:6]}, unexpected {sorted(unexpected)[:6]}."
            )
        return model.eval()


def _config_beside(path: Path) -> EvaVisionConfig | None:
    candidate = path.with_suffix(".json")
    return EvaVisionConfig.from_json(candidate) if candidate.is_file() else None


def load_eva_tower(path: str | os.PathLike) -> EvaVisionTower:
    """The vision tower of an eva_clip checkpoint (``.pt``/``.bin`` via ``torch.load(weights_only=True)``,
    or ``.safetensors``); a ``.json`` config of the same name is read when present."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise CheckpointError(
            f"--eva-clip {path}: no such file. PuLID needs EVA02_CLIP_L_336_psz14_s6B.pt (QuanSun/EVA-CLIP)."
        )
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = load_torch_file(str(path))
    except Exception as exc:  # noqa: BLE001 - any unreadable file is the user's input error
        raise CheckpointError(f"--eva-clip {path}: cannot read it as a checkpoint ({exc}).") from exc
    for key in ("model", "module", "state_dict"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
            break
    if not isinstance(state, dict):
        raise CheckpointError(f"--eva-clip {path}: the file holds no state dict.")
    state = {(k[7:] if k.startswith("module.") else k): v for k, v in state.items()}
    if any(k.startswith("visual.") for k in state):
        state = {k[7:]: v for k, v in state.items() if k.startswith("visual.")}
    return EvaVisionTower.from_state_dict(state, _config_beside(path))


__all__ = ["EvaVisionConfig", "EvaVisionTower", "HIDDEN_BLOCKS", "load_eva_tower", "rotary_tables"]
