"""An IP-Adapter: projection + per-layer image key/value weights, and how it attaches to a UNet.

:class:`IPAdapter` owns the trainable parts (``image_proj`` and one :class:`~idcraft.injection.IPAttnProcessor`
per cross-attention layer, keyed by the official layer index). It converts to and from the official
checkpoint layout, checks that it fits a given UNet and image encoder before anything runs, and attaches
to / detaches from a UNet (and ControlNets) without touching their weights.
"""

from __future__ import annotations

import re
import weakref
from collections.abc import Iterable

import torch
from torch import nn

from .checkpoints import AdapterCheckpoint, load_checkpoint
from .errors import CheckpointError, IncompatibleAdapterError
from .injection import (
    AdapterRouter,
    CallState,
    ControlNetAttnProcessor,
    IPAttnProcessor,
    TokenLayout,
    attention_layers,
    attention_module,
    cross_attention_layers,
    install,
)
from .projections import PROJECTIONS, projection_from_state_dict
from .registry import Method, get_method, resolve_method

_LAYER_KEY = re.compile(r"^(\d+)\.(to_[kv]_ip\.weight|to_(?:q|k|v|out)_lora\.(?:down|up)\.weight)$")

#: Known widths, so error messages can say which model a number belongs to.
CROSS_ATTENTION_NAMES = {768: "SD1.x", 1024: "SD2.x", 2048: "SDXL"}
ENCODER_NAMES = {
    ("pooled", 1024): "OpenCLIP ViT-H/14 (models/image_encoder in h94/IP-Adapter)",
    ("pooled", 1280): "OpenCLIP ViT-bigG/14 (sdxl_models/image_encoder in h94/IP-Adapter)",
    ("pooled", 768): "CLIP ViT-L/14",
    ("penultimate", 1280): "OpenCLIP ViT-H/14 (models/image_encoder in h94/IP-Adapter)",
    ("penultimate", 1664): "OpenCLIP ViT-bigG/14 (sdxl_models/image_encoder in h94/IP-Adapter)",
    ("penultimate", 1024): "CLIP ViT-L/14",
}


def _named(width: int, names: dict) -> str:
    return f"{width} ({names[width]})" if width in names else str(width)


class IPAdapter(nn.Module):
    """Projection and decoupled cross-attention weights of one IP-Adapter."""

    def __init__(
        self, method: Method, image_proj: nn.Module, layers: dict[int, IPAttnProcessor], layout: TokenLayout
    ):
        super().__init__()
        self.method = method
        self.image_proj = image_proj
        self.layers = nn.ModuleDict({str(i): p for i, p in sorted(layers.items())})
        self.layout = layout
        self._attached: list[tuple[nn.Module, dict]] = []

    # ----------------------------------------------------------------- construction
    @classmethod
    def from_checkpoint(cls, source: str | AdapterCheckpoint, method: str | None = None) -> IPAdapter:
        """Build from an official file (or loaded checkpoint); every width, token count and LoRA rank comes
        from the tensors' shapes."""
        ckpt = load_checkpoint(source) if not isinstance(source, AdapterCheckpoint) else source
        resolved = resolve_method(method, ckpt.image_proj, ckpt.ip_adapter, filename=ckpt.source)
        image_proj = projection_from_state_dict(resolved.projection, ckpt.image_proj)
        layout = TokenLayout()
        grouped: dict[int, dict[str, torch.Tensor]] = {}
        for key, tensor in ckpt.ip_adapter.items():
            match = _LAYER_KEY.match(key)
            if not match:
                raise CheckpointError(
                    f"{ckpt.source}: unexpected ip_adapter key {key!r} (expected '<i>.to_k_ip.weight' or "
                    "'<i>.to_q_lora.down.weight' ...)."
                )
            grouped.setdefault(int(match.group(1)), {})[match.group(2)] = tensor
        return cls(
            resolved,
            image_proj,
            {i: _processor_from_tensors(i, t, layout, ckpt.source) for i, t in grouped.items()},
            layout,
        )

    @classmethod
    def for_unet(
        cls,
        unet: nn.Module,
        method: str | Method,
        image_embed_dim: int,
        num_tokens: int | None = None,
        *,
        clip_embed_dim: int | None = None,
        lora_rank: int = 128,
    ) -> IPAdapter:
        """A freshly initialised adapter for ``unet`` (for training).

        ``image_embed_dim`` is the width the projection reads (CLIP feature width, or the identity
        embedding's for FaceID); ``clip_embed_dim`` the CLIP hidden width FaceID-Plus also reads.
        ``to_k_ip``/``to_v_ip`` start as copies of each layer's ``to_k``/``to_v``, as the official training
        script does; FaceID's LoRA starts at zero (up-projection zero), so training starts from the base.
        """
        method = get_method(method) if isinstance(method, str) else method
        cross = unet.config.cross_attention_dim
        proj = _fresh_projection(method, cross, image_embed_dim, num_tokens, clip_embed_dim)
        layout = TokenLayout()
        layers = {}
        targets = attention_layers(unet) if method.lora else cross_attention_layers(unet)
        for index, name in targets.items():
            attn = attention_module(unet, name)
            is_cross = not name.endswith("attn1.processor")
            proc = IPAttnProcessor(
                attn.to_q.out_features,
                attn.to_k.in_features,
                layout,
                image=is_cross,
                lora_rank=lora_rank if method.lora else None,
            )
            if is_cross:
                proc.to_k_ip.weight.data.copy_(attn.to_k.weight.data)
                proc.to_v_ip.weight.data.copy_(attn.to_v.weight.data)
            layers[index] = proc
        return cls(method, proj, layers, layout)

    @property
    def image_layers(self) -> dict[int, IPAttnProcessor]:
        """The layers with image key/value weights (the cross-attention layers)."""
        return {int(i): p for i, p in self.layers.items() if p.has_image}

    def to_checkpoint(self) -> AdapterCheckpoint:
        """The official layout: ``image_proj`` = projection state dict, ``ip_adapter`` = ``"<i>.to_k_ip.weight"``..."""
        ip_adapter = {f"{i}.{k}": t for i, proc in self.layers.items() for k, t in proc.state_dict().items()}
        return AdapterCheckpoint(dict(self.image_proj.state_dict()), ip_adapter)

    # ----------------------------------------------------------------- properties read from the weights
    @property
    def embed_dim(self) -> int:
        """Width of the feature the projection reads first: CLIP features, or the identity embedding."""
        return self.image_proj.config.embed_dim

    @property
    def clip_dim(self) -> int | None:
        """Width of the CLIP features the projection reads (``None`` for identity-only methods)."""
        if self.method.inputs == "face":
            return None
        return self.image_proj.config.clip_embed_dim if self.method.inputs == "face+image" else self.embed_dim

    @property
    def cross_attention_dim(self) -> int:
        return next(iter(self.image_layers.values())).to_k_ip.in_features

    @property
    def scale(self) -> float:
        return next(iter(self.image_layers.values())).scale

    def set_scale(self, scale: float) -> None:
        """The scale used when the UNet is called with no generation call active (training); a generation
        passes its own in its :class:`~idcraft.injection.CallState`."""
        for proc in self.layers.values():
            proc.scale = float(scale)

    # ----------------------------------------------------------------- compatibility
    def check_compatible(
        self,
        unet: nn.Module,
        encoder_config=None,
        *,
        base_name: str = "the base model",
        encoder_name: str = "the image encoder",
    ) -> None:
        """Raise :class:`IncompatibleAdapterError` naming both sides' widths if this adapter cannot run on
        ``unet`` with an encoder of ``encoder_config``; called before anything is generated."""
        unet_cross = unet.config.cross_attention_dim
        if isinstance(unet_cross, (list, tuple)):
            unet_cross = unet_cross[0]
        mine = self.cross_attention_dim
        if mine != unet_cross:
            from .prechecks import cross_attention_mismatch

            raise cross_attention_mismatch(mine, unet_cross, base_name)
        expected = cross_attention_layers(unet)
        if set(self.image_layers) != set(expected):
            raise IncompatibleAdapterError(
                f"the adapter has image key/value weights for {len(self.image_layers)} attention layers "
                f"(indices {_span(self.image_layers)}), but {base_name} has {len(expected)} cross-attention "
                f"layers (indices {_span(expected)}): it was made for a UNet with a different block layout."
            )
        every = attention_layers(unet)
        lora_layers = {int(i) for i, p in self.layers.items() if p.lora_rank}
        if lora_layers and lora_layers != set(every):
            raise IncompatibleAdapterError(
                f"the adapter has LoRA for {len(lora_layers)} attention layers, but {base_name} has "
                f"{len(every)}: it was made for a UNet with a different block layout."
            )
        for index, proc in self.layers.items():
            name = every.get(int(index))
            attn = attention_module(unet, name) if name else None
            if attn is None or proc.width != attn.to_q.out_features:
                raise IncompatibleAdapterError(
                    f"adapter layer {index} works at width {proc.width}, but {base_name}'s layer "
                    f"{(name or '?').removesuffix('.processor')} works at width "
                    f"{attn.to_q.out_features if attn is not None else 'none'}."
                )
        if encoder_config is not None and self.clip_dim is not None:
            have = (
                encoder_config.projection_dim
                if self.method.feature == "pooled"
                else encoder_config.hidden_size
            )
            want = self.clip_dim
            if have != want:
                what = "pooled, projected embedding" if self.method.feature == "pooled" else "hidden states"
                raise IncompatibleAdapterError(
                    f"the adapter ({self.method.name}) reads image features of width "
                    f"{_named(want, {k[1]: v for k, v in ENCODER_NAMES.items() if k[0] == self.method.feature})}, "
                    f"but {encoder_name} gives {what} of width {have}. Point --image-encoder at "
                    f"{ENCODER_NAMES.get((self.method.feature, want), 'the encoder this adapter was trained with')}."
                )

    # ----------------------------------------------------------------- attach / detach
    def call_state(
        self, scale: float = 1.0, num_tokens: int = 0, regions=None, lora_scale: float = 1.0
    ) -> CallState:
        """The per-request values of one generation with this adapter (see :func:`idcraft.injection.adapter_call`)."""
        return CallState(float(scale), int(num_tokens), tuple(regions) if regions else None, float(lora_scale))

    def attach(
        self, unet: nn.Module, controlnets: Iterable[nn.Module] = (), *, merge_lora: bool = False
    ) -> None:
        """Put this adapter's processors on ``unet``'s attention layers, beside any other adapter attached
        there (each layer gets an :class:`~idcraft.injection.AdapterRouter`; a call says which adapter acts).
        ControlNets see the text tokens; for InstantID the first ControlNet is IdentityNet and sees the
        identity tokens instead (extra ControlNets, pose or depth say, still see the text, as in the
        official pipeline). :meth:`detach` undoes it.

        ``merge_lora`` (inference; FaceID): while this adapter is the only one on ``unet``, its LoRA is
        added into the attention weights, so a step costs what the base model's does instead of four
        extra low-rank products per layer; the original weights are kept and put back bit for bit when it
        is detached or another adapter joins it (which then computes the LoRA on the fly again)."""
        self.check_compatible(unet)
        unmerge_lora(unet)  # an adapter merged here is no longer alone
        names = attention_layers(unet)
        current = unet.attn_processors
        routers = {}
        for index, proc in self.layers.items():
            name = names[int(index)]
            router = current[name]
            if not isinstance(router, AdapterRouter):
                router = AdapterRouter(router)
            router.add(self.layout, proc)
            routers[name] = router
        install(unet, routers)
        self._attached.append((unet, None))
        for position, net in enumerate(controlnets):
            sees = "image" if self.method.identitynet and position == 0 else "text"
            previous = dict(net.attn_processors)
            install(net, {name: ControlNetAttnProcessor(self.layout, sees) for name in previous})
            self._attached.append((net, previous))
        if merge_lora and self.method.lora and _alone(unet):
            _merge_lora(self, unet)

    def detach(self) -> None:
        """Take this adapter's processors off the models :meth:`attach` put them on (a layer with no adapter
        left gets back the processor it had before any); merged LoRA is taken out of the weights first."""
        while self._attached:
            model, previous = self._attached.pop()
            if previous is not None:
                install(model, previous)
                continue
            if _MERGED.get(model, (None,))[0] is self:
                unmerge_lora(model)
            restored = {}
            for name, proc in model.attn_processors.items():
                if isinstance(proc, AdapterRouter):
                    proc.remove(self.layout)
                    restored[name] = proc if len(proc) else proc.base
            install(model, restored)

    def project(self, features: torch.Tensor) -> torch.Tensor:
        """Encoder features of N reference images -> ``[N, tokens, cross_attention_dim]``."""
        return self.image_proj(features)


#: UNet -> (the adapter whose LoRA is merged into its weights, {parameter: original weight}).
_MERGED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_LORA_TARGETS = (("to_q", "to_q_lora"), ("to_k", "to_k_lora"), ("to_v", "to_v_lora"), ("to_out.0", "to_out_lora"))


def merged_lora_method(unet: nn.Module) -> str | None:
    """The method whose LoRA is merged into ``unet``'s weights (see :meth:`IPAdapter.attach`), or ``None``:
    while one is, the weights are not the base model's, so a call with every adapter off would still
    carry that LoRA."""
    adapter = _MERGED.get(unet, (None,))[0]
    return None if adapter is None else adapter.method.name


def _alone(unet: nn.Module) -> bool:
    routers = [p for p in unet.attn_processors.values() if isinstance(p, AdapterRouter)]
    return bool(routers) and all(len(r) == 1 for r in routers)


@torch.no_grad()
def _merge_lora(adapter: IPAdapter, unet: nn.Module) -> None:
    """``W += up @ down`` (in float32, then the weight's dtype) for every LoRA of ``adapter``."""
    names = attention_layers(unet)
    originals: dict[nn.Parameter, torch.Tensor] = {}
    for index, proc in adapter.layers.items():
        if not proc.lora_rank:
            continue
        attn = attention_module(unet, names[int(index)])
        for target, lora_name in _LORA_TARGETS:
            weight = attn.get_submodule(target).weight
            lora = getattr(proc, lora_name)
            delta = lora.up.weight.float() @ lora.down.weight.float()
            originals[weight] = weight.data.clone()
            weight.data.copy_((weight.data.float() + delta.to(weight.device)).to(weight.dtype))
        proc.lora_merged = True
    _MERGED[unet] = (adapter, originals)


@torch.no_grad()
def unmerge_lora(unet: nn.Module) -> None:
    """Put back the weights an adapter's merged LoRA changed on ``unet`` (bit for bit); no-op if none."""
    adapter, originals = _MERGED.pop(unet, (None, {}))
    for weight, original in originals.items():
        weight.data.copy_(original)
    if adapter is not None:
        for proc in adapter.layers.values():
            proc.lora_merged = False


def _fresh_projection(
    method: Method, cross: int, embed_dim: int, num_tokens: int | None, clip_embed_dim: int | None
) -> nn.Module:
    """The projection of ``method`` at the official widths for a UNet of cross-attention width ``cross``."""
    kind = method.projection
    if kind == "linear":
        return PROJECTIONS[kind](embed_dim=embed_dim, cross_attention_dim=cross, num_tokens=num_tokens or 4)
    if kind == "mlp":
        return PROJECTIONS[kind](embed_dim=embed_dim, cross_attention_dim=cross)
    if kind == "resampler":
        dim = 1280 if cross > 1280 else cross  # the official SDXL Resampler is 1280 wide, SD1.5's 768
        return PROJECTIONS[kind](
            dim=dim,
            depth=4,
            dim_head=64,
            heads=max(1, dim // 64),
            num_queries=num_tokens or 16,
            embed_dim=embed_dim,
            output_dim=cross,
        )
    tokens = num_tokens or (16 if method.name == "faceid-portrait" else 4)
    if kind == "faceid-mlp":
        return PROJECTIONS[kind](
            embed_dim=embed_dim, hidden_dim=2 * embed_dim, cross_attention_dim=cross, num_tokens=tokens
        )
    if clip_embed_dim is None:
        raise ValueError(f"{method.name} also reads CLIP features: give clip_embed_dim")
    return PROJECTIONS[kind](
        embed_dim=embed_dim,
        hidden_dim=2 * embed_dim,
        cross_attention_dim=cross,
        num_tokens=tokens,
        clip_embed_dim=clip_embed_dim,
        depth=4,
        heads=max(1, cross // 64),
        dim_head=64,
    )


def _processor_from_tensors(
    index: int, tensors: dict[str, torch.Tensor], layout: TokenLayout, source: str
) -> IPAttnProcessor:
    """One layer's processor, its kind (image weights, LoRA or both) and widths read from its tensors."""
    has_image = "to_k_ip.weight" in tensors or "to_v_ip.weight" in tensors
    has_lora = any(k.endswith("_lora.down.weight") for k in tensors)
    if has_image and not {"to_k_ip.weight", "to_v_ip.weight"} <= set(tensors):
        raise CheckpointError(f"{source}: layer {index} lacks to_k_ip or to_v_ip weights.")
    if has_image:
        hidden, cross = tensors["to_k_ip.weight"].shape
    else:
        hidden, cross = tensors["to_k_lora.up.weight"].shape[0], tensors["to_k_lora.down.weight"].shape[1]
    rank = tensors["to_q_lora.down.weight"].shape[0] if has_lora else None
    dtype = next(iter(tensors.values())).dtype
    proc = IPAttnProcessor(hidden, cross, layout, image=has_image, lora_rank=rank).to(dtype)
    try:
        proc.load_state_dict(tensors)
    except RuntimeError as exc:
        raise CheckpointError(f"{source}: layer {index} has inconsistent tensors: {exc}") from exc
    return proc


def _span(indices) -> str:
    values = sorted(int(i) for i in indices)
    return f"{values[0]}..{values[-1]}" if values else "none"
