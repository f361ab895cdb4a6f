"""PuLID (SDXL) training on the fidelity fixture's tiny SDXL: only the IDFormer and the ID attention change,
the alignment loss is zero without identity and positive with it, the release written has
pulid_v1.1.safetensors' layout and `idcraft generate --method pulid` loads it, gradient checkpointing
trains the same weights, and the wrong inputs are refused clearly."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from idcraft.cli import main
from idcraft.errors import IdcraftError
from idcraft.training import TrainConfig, Trainer

from ..faces.tiny_onnx import tiny_face_photo

CASE = Path(__file__).resolve().parents[1] / "fixtures" / "pulid-sdxl"
FLUX_RELEASE = Path(__file__).resolve().parents[1] / "fixtures" / "pulid-flux" / "pulid_flux_tiny.safetensors"
#: The fixture release's IDFormer (reads the tiny EVA tower: class token 24, width 16).
IDFORMER = {"dim": 32, "depth": 5, "heads": 1, "num_id_token": 2, "num_queries": 4, "output_dim": 64,
            "mapping_dim": 40}  # fmt: skip
STEPS = 2


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """Four captioned 32 px targets, each with a 512 aligned face (two given by keypoints in a larger
    photo) and a raw embedding; and a tiny BiSeNet."""
    root = tmp_path_factory.mktemp("pulid-sdxl-train")
    rng = np.random.default_rng(0)
    lines = []
    for i in range(4):
        y, x = np.mgrid[0:32, 0:32]
        target = np.stack([(x * (i + 3)) % 256, (y * (2 * i + 1)) % 256, rng.integers(0, 255, (32, 32))], -1)
        Image.fromarray(target.astype(np.uint8)).save(root / f"img{i}.png")
        np.save(root / f"emb{i}.npy", (rng.standard_normal(512) * 20).astype(np.float32))
        line = {"image": f"img{i}.png", "text": "portrait of a person", "embedding": f"emb{i}.npy"}
        if i % 2:
            photo = rng.integers(0, 255, (600, 700, 3)).astype(np.uint8)
            Image.fromarray(photo).save(root / f"photo{i}.png")
            kps = [[280, 260], [400, 258], [340, 330], [292, 400], [392, 398]]
            line |= {"reference": f"photo{i}.png", "kps": kps}
        else:
            Image.fromarray(rng.integers(0, 255, (512, 512, 3)).astype(np.uint8)).save(root / f"face{i}.png")
            line["reference"] = f"face{i}.png"
        lines.append(line)
    (root / "data.jsonl").write_text("\n".join(json.dumps(line) for line in lines))
    from idcraft.pulid.bisenet import BiSeNet

    torch.manual_seed(0)
    torch.save(BiSeNet(width=8, context=16, fuse=24, aux=8).state_dict(), root / "bisenet.pth")
    return root


def _config(data, output, **overrides) -> TrainConfig:
    settings = dict(
        method="pulid",
        base=str(CASE / "base"),
        image_encoder=str(CASE / "eva_tiny.pt"),
        data=str(data / "data.jsonl"),
        output=str(output),
        resolution=32,
        batch_size=2,
        progress=False,
        tensorboard=False,
        checkpoint_every=1000,
        drop_image=0.0,
        drop_text=0.0,
        drop_both=0.0,
        seed=1,
        max_steps=STEPS,
        learning_rate=1e-3,
        extra={"face_parsing": "none", "idformer": dict(IDFORMER)},
    )
    settings.update(overrides)
    return TrainConfig(**settings)


def test_train_save_load_generate(data, tiny_face_pack, tmp_path):
    """The official preprocessing (BiSeNet labels) and a preview through the engine at the last step, then
    `idcraft generate` on the written release."""
    config = _config(
        data,
        tmp_path / "run",
        image_encoder_2=str(data / "bisenet.pth"),
        drop_image=0.3,
        sample_every=STEPS,
        sample_reference=str(tiny_face_photo(tmp_path / "me.png")),
        sample_steps=2,
        face_models=str(tiny_face_pack),
    )
    config.extra.pop("face_parsing")
    result = Trainer(config).run()
    release = tmp_path / "run" / "adapter.safetensors"
    assert release in result.files and result.step == STEPS
    assert list((tmp_path / "run" / "samples").glob(f"step-{STEPS:08d}-*.png"))
    assert np.isfinite(result.losses).all()
    ours, official = load_file(str(release)), load_file(str(CASE / "pulid_tiny.safetensors"))
    assert {k: v.shape for k, v in ours.items()} == {k: v.shape for k, v in official.items()}

    flags = ["--prompt", "a portrait photo", "--seed", "3", "--steps", "2", "--width", "32", "--height", "32",
             "--face-embedding", str(CASE / "embedding_0.npy"), "--aligned-face", str(CASE / "aligned_0.png"),
             "--face-parsing", str(CASE / "parsing_0.png"), "--base", str(CASE / "base"), "--adapter", str(release),
             "--eva-clip", str(CASE / "eva_tiny.pt"), "--device", "cpu"]  # fmt: skip
    assert main(["generate", *flags, "--output", str(tmp_path / "id.png")]) == 0
    assert main(["generate", *flags, "--scale", "0", "--output", str(tmp_path / "base.png")]) == 0
    with_id, without = (np.asarray(Image.open(tmp_path / n), dtype=np.int16) for n in ("id.png", "base.png"))
    assert with_id.shape == (32, 32, 3)
    assert np.abs(with_id - without).mean() > 0.5  # the trained identity branch acts


def test_only_the_adapter_trains_and_alignment_loss_behaves(data, tmp_path):
    from accelerate.utils import set_seed

    from idcraft.training.data import SampleLoader, collate, list_records
    from idcraft.training.recipe import recipe_for

    config = _config(data, tmp_path / "unused")
    recipe = recipe_for("pulid")(config)
    set_seed(0)
    recipe.build(torch.device("cpu"), torch.float32)
    names = {n.split(".")[0] for n, _ in recipe.adapter.named_parameters()}
    assert names == {"id_adapter", "id_adapter_attn_layers"}
    frozen = {k: v.clone() for k, v in recipe.unet.state_dict().items() if "id_to_" not in k}
    loader = SampleLoader(list_records(config.data)[0], recipe.resolution, recipe.reference_preprocessor())
    batch = collate([loader[i] for i in range(2)])
    id_cond, hidden = recipe.unpack_features(recipe.encode_references(batch))
    assert id_cond.shape == (2, 512 + 24) and len(hidden) == 5
    assert torch.allclose(id_cond[:, :512], batch["embedding"])

    inputs = recipe.diffusion_inputs(batch, torch.Generator().manual_seed(0))
    args = (inputs.noisy, inputs.timesteps, inputs.text, inputs.added, id_cond, hidden)
    prediction, sem, layout = recipe.model(*args, torch.tensor([True, True]), True)
    assert sem > 0 and layout > 0
    dropped, sem0, layout0 = recipe.model(*args, torch.tensor([False, False]), True)
    assert sem0 == 0 and layout0 == 0
    # a dropped sample runs with the unconditional tokens (the negative branch's), not with its identity
    assert not torch.allclose(prediction, dropped)
    half, _, _ = recipe.model(*args, torch.tensor([True, False]), False)
    assert torch.allclose(half[0], prediction[0], atol=1e-5) and torch.allclose(
        half[1], dropped[1], atol=1e-5
    )

    loss = recipe.loss(recipe.model, batch, torch.Generator().manual_seed(0))
    loss.backward()
    grads = [p.grad for p in recipe.adapter.parameters()]
    assert all(g is not None for g in grads) and all(g.abs().sum() > 0 for g in grads)
    assert all(p.grad is None for n, p in recipe.unet.named_parameters() if "id_to_" not in n)
    for key, value in recipe.unet.state_dict().items():
        if key in frozen:
            assert torch.equal(value, frozen[key])


def test_gradient_checkpointing_trains_the_same_weights(data, tmp_path):
    """The ID tokens travel in a context variable; the checkpointed blocks' recomputation in backward()
    must see them too (idcraft.training.checkpointing)."""
    plain = _config(data, tmp_path / "plain", max_steps=1)
    checkpointed = _config(data, tmp_path / "gc", max_steps=1, gradient_checkpointing=True)
    Trainer(plain).run()
    trainer = Trainer(checkpointed)
    trainer.run()
    assert trainer.recipe.unet.is_gradient_checkpointing
    a, b = (load_file(str(tmp_path / n / "adapter.safetensors")) for n in ("plain", "gc"))
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)


def test_init_from_a_release_and_clear_refusals(data, tmp_path):
    from idcraft.training.recipe import recipe_for

    recipe = recipe_for("pulid")(
        _config(data, tmp_path / "init", init_from=str(CASE / "pulid_tiny.safetensors"))
    )
    recipe.build(torch.device("cpu"), torch.float32)
    official = load_file(str(CASE / "pulid_tiny.safetensors"))
    assert all(torch.equal(recipe.trainable_state_dict()[k], official[k].float()) for k in official)

    refusals = {
        "not a PuLID SDXL release": dict(init_from=str(FLUX_RELEASE)),
        "unknown extra setting": dict(extra={"face_parsing": "none", "ortho_mode": "v2"}),
        "--ortho must be one of": dict(extra={"face_parsing": "none", "ortho": "v3"}),
        "--image-encoder EVA02": dict(image_encoder=None),
        "--image-encoder-2 parsing_bisenet.pth": dict(extra={}),
        "use --method pulid-flux": dict(base=str(CASE.parent / "pulid-flux" / "base")),
    }
    for message, change in refusals.items():
        with pytest.raises(IdcraftError, match=message):
            recipe_for("pulid")(_config(data, tmp_path / "bad", **change)).build(
                torch.device("cpu"), torch.float32
            )
