"""Training recipe for the IP-Adapter family (IP-Adapter, Plus, Plus-Face, Full-face) on SD1.x / SDXL.

What trains is exactly what the official scripts train: the projection (``image_proj``) and every
cross-attention layer's ``to_k_ip`` / ``to_v_ip``, the latter starting as copies of the layer's text
``to_k`` / ``to_v`` (:meth:`IPAdapter.for_unet`). The base model and CLIP image encoder are frozen.

A dropped image is represented as the method's registry rule says, as in the official scripts: zero
pooled embeddings (``zero-embeds``: IP-Adapter) or the encoder's features of an all-zero normalised pixel
tensor (``zero-image``: Plus, Plus-Face, Full-face). Both are one fixed tensor, computed once here.

``--init-from FILE`` starts from an official-layout adapter file instead (fine-tuning a released adapter,
or Plus-Face from Plus as the official Plus-Face was made): :func:`adapter_from_file` checks that it is the
method's kind of adapter and fits the base model, the image encoder and the run's settings first.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from PIL import Image
from torch import nn

from ..adapter import IPAdapter
from ..checkpoints import load_checkpoint
from ..encoders import ClipImageEncoder
from ..errors import CheckpointError, IdcraftError, IncompatibleAdapterError
from ..models import load_image_encoder
from ..registry import Method, get_method
from .config import TrainConfig
from .diffusion import UNetDiffusionRecipe
from .recipe import adapter_checkpoint, export_tensors, register_adapter, register_recipe, write_adapter


def projection_tokens(adapter: IPAdapter) -> int | None:
    """The image tokens a projection makes, where its weights fix the count (``None``: one per patch)."""
    config = adapter.image_proj.config
    return getattr(config, "num_tokens", None) or getattr(config, "num_queries", None)


def adapter_from_file(
    config: TrainConfig,
    method: Method,
    unet: nn.Module,
    *,
    embed_dim: int | None = None,
    encoder_config=None,
    lora_rank: int | None = None,
) -> IPAdapter:
    """``--init-from``: the adapter in ``config.init_from`` (official layout), as the starting weights.

    Refused with a message naming the file and the mismatch: another kind of adapter (the projection or
    LoRA do not match ``method``), another base model (cross-attention width, layer layout), another image
    encoder (feature width; ``embed_dim`` for identity embeddings), or a token count / LoRA rank other
    than the run's ``--num-tokens`` / ``--lora-rank``.
    """
    path = config.init_from
    try:
        checkpoint = load_checkpoint(path)
        adapter = IPAdapter.from_checkpoint(checkpoint, method=method.name)
    except CheckpointError as exc:
        raise IdcraftError(f"--init-from {path}: {exc}") from exc
    made_for = checkpoint.metadata.get("method")
    try:
        adapter.check_compatible(
            unet,
            encoder_config,
            base_name=f"base model {config.base}",
            encoder_name=f"image encoder {config.image_encoder}",
        )
    except IncompatibleAdapterError as exc:
        raise IdcraftError(f"--init-from {path} cannot train on this run's models: {exc}") from exc
    problems = []
    if embed_dim is not None and adapter.embed_dim != embed_dim:
        problems.append(
            f"its projection reads {adapter.embed_dim}-wide embeddings, this run gives {embed_dim}"
        )
    tokens = projection_tokens(adapter)
    if config.num_tokens is not None and tokens is not None and tokens != config.num_tokens:
        problems.append(f"it makes {tokens} image tokens but --num-tokens is {config.num_tokens}")
    if lora_rank is not None:
        ranks = {p.lora_rank for p in adapter.layers.values()}
        if ranks != {lora_rank}:
            problems.append(
                f"its LoRA rank is {', '.join(str(r) for r in sorted(ranks, key=str))} but --lora-rank is "
                f"{lora_rank} (pass --lora-rank {next(iter(ranks))} to continue it)"
            )
    if problems:
        what = f" (a {made_for} file)" if made_for else ""
        raise IdcraftError(
            f"--init-from {path}{what} does not fit this {method.name} run: " + "; ".join(problems) + "."
        )
    return adapter


class AdapterDenoiser(nn.Module):
    """UNet + adapter as one module, so ``accelerate.prepare`` (DDP) wraps the forward that uses the
    adapter's parameters. Image tokens are appended to the text tokens, as at inference."""

    def __init__(self, unet: nn.Module, adapter: IPAdapter):
        super().__init__()
        self.unet = unet
        register_adapter(self, adapter, "image_proj")  # its attention processors are in the denoiser

    def forward(
        self,
        noisy: torch.Tensor,
        timesteps: torch.Tensor,
        text: torch.Tensor,
        features: torch.Tensor,
        added: dict | None = None,
    ) -> torch.Tensor:
        tokens = self.adapter.project(features.to(next(self.adapter.image_proj.parameters()).dtype))
        self.adapter.layout.num_tokens = tokens.shape[1]
        hidden = torch.cat([text, tokens.to(text.dtype)], dim=1)
        return self.unet(noisy, timesteps, encoder_hidden_states=hidden, added_cond_kwargs=added).sample


class ClipPreprocess:
    """Reference image -> ``{"clip_pixels": [3, 224, 224]}`` with the official CLIP preprocessing
    (picklable, for DataLoader workers)."""

    def __init__(self, processor):
        self.processor = processor

    def __call__(self, image: Image.Image) -> dict[str, torch.Tensor]:
        return {"clip_pixels": self.processor(images=[image], return_tensors="pt").pixel_values[0]}


@register_recipe
class IPAdapterRecipe(UNetDiffusionRecipe):
    """IP-Adapter family: CLIP image features -> projection -> decoupled cross-attention."""

    methods = ("ip-adapter", "ip-adapter-plus", "ip-adapter-plus-face", "ip-adapter-full-face")

    def build(self, device: torch.device, weight_dtype: torch.dtype) -> None:
        self.method = get_method(self.config.method)
        if not self.config.image_encoder:
            raise IdcraftError(
                f"{self.method.name} training needs --image-encoder: the CLIP image encoder folder "
                "the adapter will be used with (e.g. models/image_encoder of h94/IP-Adapter)."
            )
        self.encoder = ClipImageEncoder(
            load_image_encoder(self.config.image_encoder, device=device, dtype=weight_dtype)
        )
        self.load_base(device, weight_dtype)
        cfg = self.encoder.config
        width = cfg.projection_dim if self.method.feature == "pooled" else cfg.hidden_size
        if self.config.init_from:
            adapter = adapter_from_file(self.config, self.method, self.unet, encoder_config=cfg)
        else:
            adapter = IPAdapter.for_unet(self.unet, self.method, width, num_tokens=self.config.num_tokens)
        adapter.to(device=device, dtype=torch.float32).requires_grad_(True).train()
        adapter.attach(self.unet)
        self.adapter = adapter
        self.model = AdapterDenoiser(self.unet, adapter)
        self.null_features = self._null_features()

    @torch.no_grad()
    def _null_features(self) -> torch.Tensor:
        """Features standing for a dropped image: ``[1, ...]``, computed once."""
        size = self.encoder.processor.crop_size
        blank = self.encoder.preprocess([Image.new("RGB", (size["width"], size["height"]))])
        features = self.encoder.features(torch.zeros_like(blank), self.method.feature)
        return torch.zeros_like(features) if self.method.uncond == "zero-embeds" else features

    # ------------------------------------------------------------------ parameters
    def frozen_modules(self) -> dict[str, nn.Module]:
        return {**self.base_modules(), "image_encoder": self.encoder.model}

    # ------------------------------------------------------------------ data
    def reference_preprocessor(self) -> ClipPreprocess:
        return ClipPreprocess(self.encoder.processor)

    @torch.no_grad()
    def encode_references(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        pixels = inputs["clip_pixels"].to(self.device, dtype=self.encoder.dtype)
        return self.encoder.features(pixels, self.method.feature)

    def cache_fingerprint(self) -> dict:
        return {
            "recipe": "ip-adapter",
            "feature": self.method.feature,
            "image_encoder": str(self.config.image_encoder),
            "dtype": str(self.encoder.dtype),
            "encoder_config": repr(self.encoder.config.to_dict()),
        }

    def condition(self, batch: dict, drop_image: torch.Tensor) -> torch.Tensor:
        features = batch["features"].to(self.device) if "features" in batch else self.encode_references(batch)
        null = self.null_features.to(features.dtype).expand_as(features)
        mask = drop_image.to(self.device).view(-1, *([1] * (features.dim() - 1)))
        return torch.where(mask, null, features)

    # ------------------------------------------------------------------ results
    def export(
        self,
        directory: Path,
        formats: Sequence[str],
        metadata: dict[str, str],
        state: Mapping[str, torch.Tensor] | None = None,
    ) -> list[Path]:
        state = self.trainable_state_dict() if state is None else state
        checkpoint = adapter_checkpoint(export_tensors(state, self.config.export_dtype))
        return write_adapter(checkpoint, directory, formats, {"method": self.method.name, **metadata})

    @torch.no_grad()
    def sample(
        self, prompt: str, reference: str, *, seed: int, steps: int, guidance: float
    ) -> list[Image.Image]:
        """Generate with a copy of the adapter through :class:`IPAdapterPipeline`: the pipeline casts and
        attaches its adapter, which must not happen to the trained one; detaching the copy puts the
        trained processors back."""
        return preview_images(
            self.adapter,
            self.pipe,
            prompt,
            reference,
            self.resolution,
            encoder=self.encoder,
            seed=seed,
            steps=steps,
            guidance=guidance,
        )


def preview_images(
    adapter: IPAdapter,
    pipe,
    prompt: str,
    reference: str,
    resolution: int,
    *,
    seed: int,
    steps: int,
    guidance: float,
    encoder=None,
    controlnet=None,
    face_backend: str = "insightface",
    face_models: str | None = None,
) -> list[Image.Image]:
    """Sample images from the adapter being trained, through the engine as a user would generate.

    The pipeline casts and attaches the adapter (and ControlNet) it is given, which must not happen to
    the trained modules: it gets copies, and detaching the copy puts the trained processors back.
    """
    from ..engine import Engine, GenerationRequest
    from ..methods import reads_faces
    from ..pipeline import IPAdapterPipeline

    preview = IPAdapter.from_checkpoint(adapter.to_checkpoint(), method=adapter.method.name)
    if controlnet is not None:
        controlnet = copy.deepcopy(controlnet).to(dtype=pipe.unet.dtype).eval()
    pipeline = IPAdapterPipeline(pipe, preview, encoder, controlnet=controlnet)
    try:
        engine = Engine([pipeline], face_backend=face_backend, face_models=face_models)
        faces = {"face_index": 0} if reads_faces(adapter.method) else {}  # a group photo: the largest face
        request = GenerationRequest(
            prompt,
            references=[reference],
            seed=seed,
            steps=steps,
            guidance=guidance,
            width=resolution,
            height=resolution,
            **faces,
        )
        return engine.generate(request).images
    finally:
        preview.detach()
