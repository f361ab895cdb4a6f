"""PuLID's identity cross-attention on diffusers' FLUX transformer.

PuLID-FLUX (``pulid_flux_v0.9.x.safetensors``, keys ``pulid_ca.{i}.*``) adds, after every
``double_interval``-th (2nd) double-stream block and every ``single_interval``-th (4th) single-stream
block -- block indices 0, 2, 4, ... and 0, 4, 8, ... --

    image += id_weight * CA_i(id_tokens, image)

where ``CA_i`` is a Perceiver-style cross-attention (:class:`IdCrossAttention`) whose queries are the
block's image tokens and whose keys/values are the 32 ID tokens. Only the image stream changes; the text
stream (double blocks) and the text part of the single-stream sequence are untouched. The official FLUX
(black-forest-labs layout) does this inside its forward; here forward hooks on the diffusers blocks do the
same, in the same order, so the base model's code stays diffusers'.

Per-request state (the tokens and the weight of one transformer call, or none) lives in a context
variable (:func:`id_call`), never on the modules: two threads on one loaded pipeline each see their own.
Outside an :func:`id_call` of this injection the hooks do nothing and the transformer computes exactly
what it computes without PuLID.

Every width and the module count come from the checkpoint's shapes; the head width (128) is the one
thing the file does not store.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass

import torch
from torch import nn

from ..errors import CheckpointError, IncompatibleAdapterError

#: Width of one head of the released ``PerceiverAttentionCA`` (16 heads x 128 = 2048).
CA_HEAD_DIM = 128
#: Official injection pattern: after every 2nd double-stream block and every 4th single-stream block.
DOUBLE_INTERVAL = 2
SINGLE_INTERVAL = 4
#: The prefix of the cross-attention modules in a release file.
CA_PREFIX = "pulid_ca."

_CA_KEY = re.compile(
    r"^(\d+)\.(norm1\.weight|norm1\.bias|norm2\.weight|norm2\.bias|to_q\.weight|to_kv\.weight|to_out\.weight)$"
)


class IdCrossAttention(nn.Module):
    """Image tokens attend to the ID tokens (the official ``PerceiverAttentionCA``, same parameter names).

    ``width`` is the transformer's width (3072 for FLUX.1), ``id_width`` the ID tokens' (2048) and
    ``inner`` the attention width (heads x :data:`CA_HEAD_DIM`). Keys/values come from the LayerNorm-ed ID
    tokens only (unlike the IDFormer's Perceiver, the queries are not appended to them); the softmax runs
    in float32 as officially, so float16 does not overflow.
    """

    def __init__(self, width: int, id_width: int, inner: int, head_dim: int = CA_HEAD_DIM):
        super().__init__()
        if inner % head_dim:
            raise CheckpointError(
                f"ID cross-attention width {inner} is not a multiple of the head width {head_dim}."
            )
        self.head_dim = head_dim
        self.heads = inner // head_dim
        self.norm1 = nn.LayerNorm(id_width)
        self.norm2 = nn.LayerNorm(width)
        self.to_q = nn.Linear(width, inner, bias=False)
        self.to_kv = nn.Linear(id_width, 2 * inner, bias=False)
        self.to_out = nn.Linear(inner, width, bias=False)

    @property
    def width(self) -> int:
        return self.to_q.in_features

    @property
    def id_width(self) -> int:
        return self.to_kv.in_features

    def forward(self, id_tokens: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
        """``id_tokens`` ``[B or 1, N, id_width]``, ``image`` ``[B, L, width]`` -> ``[B, L, width]``."""
        id_tokens = self.norm1(id_tokens)
        image = self.norm2(image)

        def heads(x: torch.Tensor) -> torch.Tensor:  # [B, L, H*D] -> [B, H, L, D]
            return x.unflatten(-1, (self.heads, self.head_dim)).transpose(1, 2)

        query = heads(self.to_q(image))
        key, value = (heads(t) for t in self.to_kv(id_tokens).chunk(2, dim=-1))
        # Scale both sides by head_dim ** -0.25 before the product, as the official module does (its
        # float16 rationale), then a float32 softmax cast back.
        scale = 1 / math.sqrt(math.sqrt(self.head_dim))
        weight = (query * scale) @ (key * scale).transpose(-2, -1)
        weight = torch.softmax(weight.float(), dim=-1).to(weight.dtype)
        out = (weight @ value).transpose(1, 2).flatten(2)
        return self.to_out(out)


def injection_points(
    double: int, single: int, double_interval: int = DOUBLE_INTERVAL, single_interval: int = SINGLE_INTERVAL
) -> list[tuple[str, int]]:
    """Where the cross-attention modules go, in their file order: ``("double", i)`` for double-stream
    block ``i % double_interval == 0``, then ``("single", i)`` likewise (FLUX.1: 10 + 10 = 20)."""
    return [("double", i) for i in range(0, double, double_interval)] + [
        ("single", i) for i in range(0, single, single_interval)
    ]


@dataclass(eq=False)
class IdCall:
    """One transformer call's identity: whose injection acts (``owner``), the ID tokens (``None``: this
    call runs without identity, e.g. before ``--start-step``) and the weight."""

    owner: PulidFluxInjection
    tokens: torch.Tensor | None
    #: a float, or (training) a ``[B, 1, 1]`` tensor weighting each sample (0 = that sample without identity)
    weight: float | torch.Tensor = 1.0


_ID_CALL: ContextVar[IdCall | None] = ContextVar("idcraft_pulid_flux_call", default=None)


@contextmanager
def id_call(call: IdCall) -> Iterator[IdCall]:
    """Run the enclosed transformer calls with ``call``'s ID tokens and weight (see :class:`IdCall`)."""
    token = _ID_CALL.set(call)
    try:
        yield call
    finally:
        _ID_CALL.reset(token)


class PulidFluxInjection(nn.Module):
    """The ``pulid_ca`` modules of a release and the hooks that put them after their FLUX blocks.

    ``ca`` keeps the official numbering (``pulid_ca.{i}``), so :meth:`state_dict` is the release layout
    under the ``pulid_ca.`` prefix when this module is an attribute named ``pulid_ca`` of its parent.
    """

    def __init__(
        self,
        modules: list[IdCrossAttention],
        double_interval: int = DOUBLE_INTERVAL,
        single_interval: int = SINGLE_INTERVAL,
    ):
        super().__init__()
        self.ca = nn.ModuleList(modules)
        self.double_interval = double_interval
        self.single_interval = single_interval
        self._hooks: list = []

    # ----------------------------------------------------------------- construction
    @classmethod
    def from_state_dict(
        cls, tensors: dict[str, torch.Tensor], source: str = "the checkpoint"
    ) -> PulidFluxInjection:
        """From the ``pulid_ca.*`` tensors with the prefix removed (``"0.to_q.weight"`` ...); the tensors
        become the parameters (no copy). Counts and widths come from the shapes."""
        grouped: dict[int, dict[str, torch.Tensor]] = {}
        for key, tensor in tensors.items():
            match = _CA_KEY.match(key)
            if not match:
                raise CheckpointError(
                    f"{source}: unexpected key {CA_PREFIX}{key}; PuLID-FLUX cross-attention modules have "
                    "norm1, norm2 (weight, bias), to_q, to_kv and to_out weights."
                )
            grouped.setdefault(int(match.group(1)), {})[match.group(2)] = tensor
        if not grouped or set(grouped) != set(range(len(grouped))):
            raise CheckpointError(
                f"{source}: {CA_PREFIX}* modules are numbered {sorted(grouped)[:5]}..., expected 0..N-1."
            )
        modules = []
        for index in range(len(grouped)):
            part = grouped[index]
            missing = {"to_q.weight", "to_kv.weight", "to_out.weight", "norm1.weight", "norm2.weight"} - set(
                part
            )
            if missing:
                raise CheckpointError(f"{source}: {CA_PREFIX}{index} has no {', '.join(sorted(missing))}.")
            inner, width = part["to_q.weight"].shape
            id_width = part["to_kv.weight"].shape[1]
            with torch.device("meta"):
                module = IdCrossAttention(width, id_width, inner)
            try:
                module.load_state_dict(part, strict=True, assign=True)
            except RuntimeError as exc:
                detail = " ".join(str(exc).split())
                raise CheckpointError(
                    f"{source}: {CA_PREFIX}{index} does not fit the shapes it implies: {detail[:300]}"
                ) from exc
            modules.append(module)
        shapes = {(m.width, m.id_width, m.heads) for m in modules}
        if len(shapes) != 1:
            raise CheckpointError(
                f"{source}: {CA_PREFIX}* modules have different shapes {sorted(shapes)[:3]}."
            )
        return cls(modules)

    @classmethod
    def for_transformer(cls, transformer: nn.Module, id_width: int, heads: int = 16) -> PulidFluxInjection:
        """Freshly initialised modules for ``transformer`` (training from scratch, tests): one per injection
        point, ``heads`` x 128 wide, reading ID tokens of ``id_width``."""
        config = transformer.config
        width = config.num_attention_heads * config.attention_head_dim
        count = len(injection_points(config.num_layers, config.num_single_layers))
        return cls([IdCrossAttention(width, id_width, heads * CA_HEAD_DIM) for _ in range(count)])

    @property
    def width(self) -> int:
        return self.ca[0].width

    @property
    def id_width(self) -> int:
        """Width of the ID tokens the modules read (the IDFormer's output, 2048 officially)."""
        return self.ca[0].id_width

    # ----------------------------------------------------------------- compatibility
    def check_compatible(self, transformer: nn.Module, base_name: str = "the base model") -> None:
        """A clear :class:`IncompatibleAdapterError` when the modules cannot run on ``transformer`` (which
        may be on the meta device): wrong width, or a count that does not match its blocks."""
        config = getattr(transformer, "config", None)
        if config is None or not hasattr(config, "num_single_layers"):
            raise IncompatibleAdapterError(
                f"this is a PuLID-FLUX adapter (pulid_ca.* modules), but {base_name} is not a FLUX transformer: "
                "use a FLUX.1 base (e.g. black-forest-labs/FLUX.1-dev), or the SDXL release pulid_v1.1 on SDXL."
            )
        width = config.num_attention_heads * config.attention_head_dim
        if width != self.width:
            raise IncompatibleAdapterError(
                f"the PuLID-FLUX cross-attention works at width {self.width}, but {base_name} has width {width}: "
                "use the FLUX.1 base the adapter was made for (width 3072 for the releases)."
            )
        points = injection_points(
            config.num_layers, config.num_single_layers, self.double_interval, self.single_interval
        )
        if len(points) != len(self.ca):
            raise IncompatibleAdapterError(
                f"the adapter has {len(self.ca)} ID cross-attention modules, but {base_name} "
                f"({config.num_layers} double + {config.num_single_layers} single blocks) has {len(points)} "
                f"injection points (every {self.double_interval}nd double and every {self.single_interval}th "
                "single block): it was made for a transformer of a different depth."
            )

    # ----------------------------------------------------------------- attach
    def attach(self, transformer: nn.Module) -> None:
        """Hook the modules after their blocks; they act only inside an :func:`id_call` of this injection."""
        self.check_compatible(transformer)
        self.detach()
        points = injection_points(
            transformer.config.num_layers,
            transformer.config.num_single_layers,
            self.double_interval,
            self.single_interval,
        )
        for module, (kind, index) in zip(self.ca, points, strict=True):
            blocks = (
                transformer.transformer_blocks if kind == "double" else transformer.single_transformer_blocks
            )
            self._hooks.append(blocks[index].register_forward_hook(self._hook_for(module)))

    def detach(self) -> None:
        while self._hooks:
            self._hooks.pop().remove()

    def _hook_for(self, module: IdCrossAttention):
        def after_block(block: nn.Module, args: tuple, output: tuple) -> tuple | None:
            call = _ID_CALL.get()
            if call is None or call.owner is not self or call.tokens is None:
                return None
            if not isinstance(call.weight, torch.Tensor) and call.weight == 0:
                return None
            # diffusers' double- and single-stream blocks both return (text, image) separately.
            text, image = output
            # In the module's own dtype: the image's at inference (the adapter is cast with the model), float32
            # in training (master weights beside a half-precision base), then back to the image's.
            dtype = module.to_q.weight.dtype
            tokens = call.tokens.to(device=image.device, dtype=dtype)
            weight = call.weight
            if isinstance(weight, torch.Tensor):
                weight = weight.to(device=image.device, dtype=image.dtype)
            return text, image + weight * module(tokens, image.to(dtype)).to(image.dtype)

        return after_block

    def call(self, tokens: torch.Tensor | None, weight: float | torch.Tensor = 1.0) -> IdCall:
        """An :class:`IdCall` of this injection (enter it with :func:`id_call`)."""
        return IdCall(self, tokens, weight if isinstance(weight, torch.Tensor) else float(weight))


def split_release(tensors: dict[str, torch.Tensor], source: str = "the checkpoint") -> tuple[dict, dict]:
    """A PuLID-FLUX release's flat tensors -> (``pulid_encoder`` tensors, ``pulid_ca`` tensors), prefixes
    removed. Any other top-level name is refused, naming it."""
    encoder: dict[str, torch.Tensor] = {}
    ca: dict[str, torch.Tensor] = {}
    for key, tensor in tensors.items():
        if key.startswith("pulid_encoder."):
            encoder[key.removeprefix("pulid_encoder.")] = tensor
        elif key.startswith(CA_PREFIX):
            ca[key.removeprefix(CA_PREFIX)] = tensor
        else:
            raise CheckpointError(
                f"{source}: unexpected key {key!r} in a PuLID-FLUX file (pulid_encoder.*, pulid_ca.*)."
            )
    return encoder, ca
