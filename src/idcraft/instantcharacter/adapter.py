"""The InstantCharacter adapter: projector + one attention processor per FLUX block, and how it attaches.

Checkpoint layout (official ``{"image_proj", "ip_adapter"}``, bf16): ``image_proj`` is the projector's state
dict (:mod:`~idcraft.instantcharacter.projector`); ``ip_adapter`` has keys ``"<i>.<param>"`` where ``i`` is
the position of the layer in ``transformer.attn_processors``, i.e. the 19 double-stream blocks first, then
the 38 single-stream blocks (the official code loads them into ``ModuleList(attn_processors.values())``).

Loading does not double memory: the modules are built on the meta device and take the checkpoint's tensors
as their parameters (``load_state_dict(assign=True)``), so the 2.8B-parameter file exists once in memory; a
dtype or device change afterwards converts tensor by tensor. Every width and count comes from the shapes.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable

import torch
from torch import nn

from ..checkpoints import AdapterCheckpoint, load_checkpoint
from ..errors import CheckpointError, IncompatibleAdapterError
from .encoders import SubjectFeatures
from .processors import SubjectAttnProcessor, SubjectCall, SubjectState, active_subject_call
from .projector import ProjectorConfig, SubjectProjector

_LAYER_KEY = re.compile(
    r"^(\d+)\.(norm_ip_q\.scale|to_k_ip\.weight|to_k_ip\.bias|norm_ip_k\.scale|to_v_ip\.weight|to_v_ip\.bias)$"
)

#: Names of known FLUX layouts, for error messages: attention layers -> (double, single) blocks.
FLUX_LAYOUTS = {57: "FLUX.1 (19 double + 38 single blocks)"}

TimestepSource = Callable[[], "torch.Tensor | None"]


def _assign(module: nn.Module, tensors: dict[str, torch.Tensor], what: str) -> nn.Module:
    """Give the meta-device ``module`` the checkpoint's tensors as parameters (no copy), strictly."""
    try:
        module.load_state_dict(tensors, strict=True, assign=True)
    except RuntimeError as exc:
        detail = " ".join(str(exc).split())
        raise CheckpointError(f"{what} does not fit the shapes it implies: {detail[:400]}") from exc
    return module


class InstantCharacterAdapter(nn.Module):
    """Projector and per-layer subject attention weights of one InstantCharacter checkpoint."""

    def __init__(
        self, projector: SubjectProjector, layers: dict[int, SubjectAttnProcessor], state: SubjectState
    ):
        super().__init__()
        self.projector = projector
        self.layers = nn.ModuleDict({str(i): p for i, p in sorted(layers.items())})
        self.state = state
        self._attached: list[tuple[nn.Module, dict, object]] = []

    # ----------------------------------------------------------------- construction and layout
    @classmethod
    def from_checkpoint(cls, source: str | os.PathLike | AdapterCheckpoint) -> InstantCharacterAdapter:
        """Build from an official file (or a loaded checkpoint, whose tensors become the parameters)."""
        ckpt = source if isinstance(source, AdapterCheckpoint) else load_checkpoint(source)
        config = ProjectorConfig.from_state_dict(ckpt.image_proj)
        state = SubjectState()
        with torch.device("meta"):
            projector = SubjectProjector(config)
        _assign(projector, ckpt.image_proj, f"{ckpt.source}: image_proj")

        grouped: dict[int, dict[str, torch.Tensor]] = {}
        for key, tensor in ckpt.ip_adapter.items():
            match = _LAYER_KEY.match(key)
            if not match:
                raise CheckpointError(
                    f"{ckpt.source}: unexpected ip_adapter key {key!r}; InstantCharacter layers have "
                    "'<i>.to_k_ip.weight/bias', '<i>.to_v_ip.weight/bias', '<i>.norm_ip_q.scale', '<i>.norm_ip_k.scale'."
                )
            grouped.setdefault(int(match.group(1)), {})[match.group(2)] = tensor
        if set(grouped) != set(range(len(grouped))):
            raise CheckpointError(
                f"{ckpt.source}: ip_adapter layers are numbered {_span(grouped)}, expected 0..N-1."
            )
        layers = {}
        for index, tensors in grouped.items():
            missing = {"to_k_ip.weight", "to_v_ip.weight", "norm_ip_q.scale"} - set(tensors)
            if missing:
                raise CheckpointError(
                    f"{ckpt.source}: ip_adapter layer {index} has no {', '.join(sorted(missing))}."
                )
            width, ip_width = tensors["to_k_ip.weight"].shape
            with torch.device("meta"):
                proc = SubjectAttnProcessor(width, ip_width, tensors["norm_ip_q.scale"].shape[0], state)
            layers[index] = _assign(proc, tensors, f"{ckpt.source}: ip_adapter layer {index}")
        adapter = cls(projector, layers, state)
        adapter._check_consistent(ckpt.source)
        return adapter

    @classmethod
    def for_transformer(cls, transformer: nn.Module, config: ProjectorConfig) -> InstantCharacterAdapter:
        """A freshly initialised adapter shaped for ``transformer`` (tests, training from scratch)."""
        state = SubjectState()
        width = transformer.config.num_attention_heads * transformer.config.attention_head_dim
        layers = {
            i: SubjectAttnProcessor(width, config.output_width, transformer.config.attention_head_dim, state)
            for i in range(len(transformer.attn_processors))
        }
        return cls(SubjectProjector(config), layers, state)

    def to_checkpoint(self) -> AdapterCheckpoint:
        """The official layout; tensors keep their dtype and the official key order."""
        ip_adapter = {f"{i}.{k}": t for i, proc in self.layers.items() for k, t in proc.state_dict().items()}
        return AdapterCheckpoint(dict(self.projector.state_dict()), ip_adapter)

    def _check_consistent(self, source: str) -> None:
        widths = {(p.width, p.ip_width, p.head_dim) for p in self.layers.values()}
        if len(widths) != 1:
            raise CheckpointError(f"{source}: ip_adapter layers have different shapes {sorted(widths)[:3]}.")
        if self.ip_width != self.projector.config.output_width:
            raise CheckpointError(
                f"{source}: the projector makes tokens of width {self.projector.config.output_width} but the "
                f"attention layers read width {self.ip_width}."
            )

    @property
    def _layer(self) -> SubjectAttnProcessor:
        return next(iter(self.layers.values()))

    @property
    def ip_width(self) -> int:
        """Width of the subject tokens the attention layers read (T5's width, 4096, officially)."""
        return self._layer.ip_width

    @property
    def feature_width(self) -> int:
        """Width of the encoder features the projector reads (SigLIP + DINOv2 hidden sizes)."""
        return self.projector.config.width

    # ----------------------------------------------------------------- compatibility
    def check_compatible(
        self,
        transformer: nn.Module | None,
        feature_width: int | None = None,
        *,
        base_name: str = "the base model",
        encoder_name: str = "the image encoders",
    ) -> None:
        """Raise :class:`IncompatibleAdapterError`, naming both sides, if this adapter cannot run on
        ``transformer`` (a FLUX transformer, possibly on the meta device) or read features of
        ``feature_width`` (either may be None: not checked). Called before any weights of the base model
        are loaded, where possible."""
        if transformer is not None:
            self._check_transformer(transformer, base_name)
        if feature_width is not None and feature_width != self.feature_width:
            raise IncompatibleAdapterError(
                f"the adapter reads encoder features of width {self.feature_width} (SigLIP + DINOv2 side by side, "
                f"1152 + 1536 = 2688 for so400m and giant), but {encoder_name} give {feature_width}. Use "
                "google/siglip-so400m-patch14-384 for --image-encoder and facebook/dinov2-giant for --image-encoder-2."
            )

    def _check_transformer(self, transformer: nn.Module, base_name: str) -> None:
        config = transformer.config
        count = len(transformer.attn_processors)
        if len(self.layers) != count:
            doubles, singles = config.num_layers, config.num_single_layers
            made = FLUX_LAYOUTS.get(len(self.layers), f"{len(self.layers)} attention layers")
            raise IncompatibleAdapterError(
                f"the adapter has subject attention weights for {len(self.layers)} FLUX blocks ({made}), but "
                f"{base_name} has {count} ({doubles} double + {singles} single blocks): it was made for a "
                "transformer with a different depth."
            )
        width = config.num_attention_heads * config.attention_head_dim
        layer = self._layer
        if (layer.width, layer.head_dim) != (width, config.attention_head_dim):
            raise IncompatibleAdapterError(
                f"the adapter's attention layers work at width {layer.width} with heads of {layer.head_dim}, but "
                f"{base_name} works at width {width} ({config.num_attention_heads} heads of "
                f"{config.attention_head_dim}): use a FLUX.1 base model (width 3072, heads of 128) with this adapter."
            )

    # ----------------------------------------------------------------- generation
    def attach(self, transformer: nn.Module) -> None:
        """Put a processor on every attention layer of ``transformer`` and a pre-forward hook that makes the
        subject tokens of each call for the active :meth:`call` (see
        :class:`~idcraft.instantcharacter.processors.SubjectCall`)."""
        self.check_compatible(transformer)
        previous = dict(transformer.attn_processors)
        names = list(previous)
        transformer.set_attn_processor({names[int(i)]: proc for i, proc in self.layers.items()})
        hook = transformer.register_forward_pre_hook(self._before_transformer, with_kwargs=True)
        self._attached.append((transformer, previous, hook))

    def detach(self) -> None:
        """Restore the processors that were in place before :meth:`attach` and remove the hook."""
        while self._attached:
            transformer, previous, hook = self._attached.pop()
            hook.remove()
            transformer.set_attn_processor(previous)

    def call(
        self,
        prepared: torch.Tensor | None,
        scale: float,
        timestep_source: TimestepSource | None = None,
    ) -> SubjectCall:
        """One generation's subject: ``prepared`` (:meth:`prepare` output) at ``scale``; ``None`` or scale 0
        switches the subject branch off (the base model's output, exactly). ``timestep_source`` returns the
        scheduler's current timestep (``FluxPipeline.current_timestep``); without one, the hook reads
        ``timestep * 1000`` from the transformer call. Enter it with
        :func:`~idcraft.instantcharacter.processors.subject_call`."""
        return SubjectCall(self.state, prepared, float(scale), timestep_source)

    def prepare(self, features: SubjectFeatures) -> torch.Tensor:
        """The timestep-independent half of the projector, on the projector's device and dtype."""
        param = self.projector.resampler.latents
        features = features.to(param.device, param.dtype)
        with torch.no_grad():
            return self.projector.prepare(
                features.low_res_shallow, features.low_res_deep, features.high_res_deep
            )

    def _before_transformer(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        """Before each transformer call of an active :meth:`call` of this adapter: where the text ends, and
        the subject tokens for the call's timestep (kept on the call, never on the adapter)."""
        call = active_subject_call()
        if call is None or call.owner is not self.state:
            return  # another adapter's call is not ours
        names = ("hidden_states", "encoder_hidden_states", "pooled_projections", "timestep")
        inputs = dict(zip(names, args, strict=False))
        inputs.update(kwargs)
        call.text_len = inputs["encoder_hidden_states"].shape[1]
        if call.scale == 0:
            call.tokens = None
            return
        if call.prepared is None:
            return  # no reference (no tokens), or tokens given with the call (training)
        latents = inputs["hidden_states"]
        source = call.timestep_source() if call.timestep_source is not None else None
        if source is None:  # a direct call: the pipeline passes timestep / 1000
            source = inputs["timestep"].reshape(-1)[:1].float() * 1000
        if call.cached is None or call.cached[0] is not source:
            # As the official pipeline: the scheduler's t, cast to the latents' dtype, for the projector.
            timestep = source.reshape(-1)[:1].to(device=call.prepared.device, dtype=latents.dtype)
            with torch.no_grad():
                tokens = self.projector.tokens(call.prepared, timestep)
            call.cached = (source, tokens)
        tokens = call.cached[1].to(latents.device)
        call.tokens = tokens.expand(latents.shape[0], -1, -1)


def _span(indices) -> str:
    values = sorted(indices)
    return f"{values[0]}..{values[-1]}" if values else "none"
