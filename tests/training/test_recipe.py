"""Recipes: lookup by method name, the objective's pieces, and a new recipe running in the unchanged loop."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from idcraft.errors import IdcraftError
from idcraft.training import RECIPES, TrainingRecipe, recipe_for, register_recipe, train
from idcraft.training.diffusion import draw_drops, weighted_mse
from idcraft.training.ip_adapter import IPAdapterRecipe

from .helpers import config


def test_lookup_by_name_and_alias():
    for name in (
        "ip-adapter",
        "ip-adapter-plus",
        "ip-adapter-plus-face",
        "ip-adapter-full-face",
        "ip-adapter_sd15.bin",
        "IP-Adapter-Plus_sdxl_vit-h",
    ):
        assert recipe_for(name) is IPAdapterRecipe
    with pytest.raises(IdcraftError, match="trainable methods: .*instantid.*ip-adapter"):
        recipe_for("no-such-method")


def test_drop_rates_follow_the_official_rule():
    image, text = draw_drops(200_000, (0.05, 0.05, 0.05), torch.Generator().manual_seed(0))
    only_image, only_text, both = (
        (image & ~text).float().mean(),
        (text & ~image).float().mean(),
        (image & text).float().mean(),
    )
    for rate in (only_image, only_text, both):
        assert abs(rate.item() - 0.05) < 0.003
    none_image, none_text = draw_drops(1000, (0.0, 0.0, 0.0), torch.Generator().manual_seed(0))
    assert not none_image.any() and not none_text.any()


@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction"])
def test_loss_is_mse_against_noise_or_velocity(models, data, tmp_path, prediction):
    """With a model that predicts zeros, the loss is the mean square of the target, which we rebuild
    from the same generator draws: VAE sample x scaling factor, noise, timestep, epsilon or velocity."""
    from idcraft.training.data import SampleLoader, collate, list_records

    cfg = config(models, data, tmp_path / "run", drop_image=0.0, drop_text=0.0, drop_both=0.0)
    recipe = IPAdapterRecipe(cfg)
    recipe.build(torch.device("cpu"), torch.float32)
    recipe.noise_scheduler.register_to_config(prediction_type=prediction)
    loader = SampleLoader(list_records(data)[0], 32, recipe.reference_preprocessor())
    batch = collate([loader[0], loader[1]])

    seen = {}

    def zero_model(noisy, timesteps, text, features, added):
        seen.update(noisy=noisy, timesteps=timesteps, text=text, features=features)
        return torch.zeros_like(noisy)

    loss = recipe.loss(zero_model, batch, torch.Generator().manual_seed(5))

    g = torch.Generator().manual_seed(5)
    torch.rand(2, generator=g)  # the drops
    posterior = recipe.pipe.vae.encode(batch["pixels"]).latent_dist
    latents = posterior.mean + posterior.std * torch.randn(posterior.mean.shape, generator=g)
    latents = latents * recipe.pipe.vae.config.scaling_factor
    noise = torch.randn(latents.shape, generator=g)
    timesteps = torch.randint(0, 1000, (2,), generator=g)
    sched = recipe.noise_scheduler
    target = sched.get_velocity(latents, noise, timesteps) if prediction == "v_prediction" else noise
    assert torch.equal(seen["timesteps"], timesteps)
    assert torch.allclose(seen["noisy"], sched.add_noise(latents, noise, timesteps), atol=1e-6)
    assert torch.allclose(loss, (target**2).mean(), rtol=1e-5)
    assert seen["text"].shape[:2] == (2, 77) and seen["features"].shape[0] == 2


def test_loss_mask_puts_the_loss_where_the_mask_lies(models, data, tmp_path):
    """A model that predicts zeros: with a mask of ones the loss is the plain MSE; with only the left
    half of the image masked in, it is the MSE over the left half of the latents, whatever the weight."""
    from idcraft.training.data import SampleLoader, collate, list_records

    cfg = config(models, data, tmp_path / "run", drop_image=0.0, drop_text=0.0, drop_both=0.0)
    recipe = IPAdapterRecipe(cfg)
    recipe.build(torch.device("cpu"), torch.float32)
    loader = SampleLoader(list_records(data)[0], 32, recipe.reference_preprocessor())
    batch = collate([loader[0], loader[1]])
    targets = []

    def zero_model(noisy, timesteps, text, features, added):
        targets.append(torch.zeros_like(noisy))
        return targets[-1]

    def loss_with(mask):
        return recipe.loss(zero_model, {**batch, "loss_mask": mask}, torch.Generator().manual_seed(5))

    plain = recipe.loss(zero_model, batch, torch.Generator().manual_seed(5))
    assert torch.allclose(loss_with(torch.ones(2, 1, 32, 32)), plain, rtol=1e-6)

    half = torch.zeros(2, 1, 32, 32)
    half[..., :16] = 0.3
    g = torch.Generator().manual_seed(5)
    torch.rand(2, generator=g)
    posterior = recipe.pipe.vae.encode(batch["pixels"]).latent_dist
    torch.randn(posterior.mean.shape, generator=g)
    noise = torch.randn(posterior.mean.shape, generator=g)
    width = noise.shape[-1]
    assert torch.allclose(loss_with(half), (noise[..., : width // 2] ** 2).mean(), rtol=1e-5)
    assert not torch.allclose(loss_with(half), plain, rtol=1e-3)


def test_weighted_mse_counts_each_element_by_its_weight():
    prediction, target = torch.zeros(1, 2, 2, 2), torch.arange(8.0).reshape(1, 2, 2, 2)
    weights = torch.tensor([[[[1.0, 0.0], [0.0, 3.0]]]])
    expected = ((target[..., 0, 0] ** 2).sum() + 3 * (target[..., 1, 1] ** 2).sum()) / 8
    assert torch.allclose(weighted_mse(prediction, target, weights), expected)
    assert torch.allclose(weighted_mse(prediction, target, torch.ones(1, 1, 2, 2)), (target**2).mean())


class ToyRecipe(TrainingRecipe):
    """A recipe unlike the UNet ones (a linear map from image statistics to a target): if the loop runs
    it, checkpoints and resumes it, families with other objectives (flow matching, ControlNets) fit too."""

    methods = ("toy-test",)

    def build(self, device, weight_dtype):
        self.frozen = nn.Linear(3, 3).requires_grad_(False)
        self.model = nn.Linear(3, 1)

    @property
    def resolution(self):
        return 16

    def trainable_parameters(self):
        return list(self.model.parameters())

    def frozen_modules(self):
        return {"frozen": self.frozen}

    def trainable_state_dict(self):
        return {k: v.detach() for k, v in self.model.state_dict().items()}

    def load_trainable_state_dict(self, state):
        self.model.load_state_dict(state)

    def reference_preprocessor(self):
        return _mean_colour

    def encode_references(self, inputs):
        return self.frozen(inputs["colour"])

    def loss(self, model, batch, generator):
        features = self.encode_references(batch)
        target = torch.randn(len(features), 1, generator=generator)
        return ((model(features) - target) ** 2).mean()

    def export(self, directory: Path, formats, metadata):
        from safetensors.torch import save_file

        path = Path(directory) / "toy.safetensors"
        save_file(self.trainable_state_dict(), str(path))
        return [path]


def _mean_colour(image):
    return {"colour": torch.tensor(image.resize((4, 4)).getdata(), dtype=torch.float32).mean(0) / 255}


def test_a_new_recipe_plugs_into_the_unchanged_loop(data, tmp_path):
    from safetensors.torch import load_file

    register_recipe(ToyRecipe)
    try:
        settings = dict(
            method="toy-test",
            base="unused",
            data=str(data),
            progress=False,
            tensorboard=False,
            batch_size=2,
            seed=4,
        )
        whole = train(config_for(settings, tmp_path / "whole", max_steps=6))

        def kill(info):
            if info.step == 4:
                raise RuntimeError("killed")

        with pytest.raises(RuntimeError):
            train(config_for(settings, tmp_path / "cut", max_steps=6, checkpoint_every=3), callbacks=[kill])
        resumed = train(config_for(settings, tmp_path / "cut", max_steps=6, checkpoint_every=3, resume=True))
        assert resumed.losses == whole.losses[3:]
        a, b = (
            load_file(str(tmp_path / "whole" / "toy.safetensors")),
            load_file(str(tmp_path / "cut" / "toy.safetensors")),
        )
        assert all(torch.equal(a[k], b[k]) for k in a)
    finally:
        RECIPES.pop("toy-test", None)


def config_for(settings, output, **more):
    from idcraft.training import TrainConfig

    return TrainConfig(**settings, output=str(output), **more)
