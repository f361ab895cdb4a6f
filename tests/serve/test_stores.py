"""The stores under the server, one by one: the conditioning codec, the folder and Redis backends (bounds,
eviction, sharing, a restart), choosing one by ``--store``, and the one-line error for one not there."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from PIL import Image

from idcraft.engine import Conditioning
from idcraft.errors import IdcraftError
from idcraft.serve.config import ServerConfig, config_from_dict
from idcraft.serve.stores import codec, open_stores, store_kind
from idcraft.serve.stores.folder import FolderStore

from .redis_server import free_port, redis_server


def key(n: int) -> str:
    return f"{n:064x}"


@pytest.fixture
def redis(tmp_path):
    with redis_server(tmp_path) as server:
        yield server


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_codec_round_trips_reference_tokens_with_identities(dtype):
    from idcraft.conditioning import Identity, ReferenceTokens

    crop = Image.fromarray(np.arange(224 * 224 * 3, dtype=np.uint8).reshape(224, 224, 3))
    identity = Identity(
        embedding=np.random.default_rng(0).standard_normal(512).astype(np.float32),
        face_crop=crop,
        kps=np.arange(10, dtype=np.float64).reshape(5, 2),
        image_size=(64, 48),
        photo=1,
    )
    tokens = ReferenceTokens(
        torch.randn(1, 4, 8).to(dtype), torch.zeros(1, 4, 8, dtype=dtype), [identity], True
    )
    back = codec.decode(codec.encode(Conditioning("faceid-plusv2", tokens)))
    assert back.method == "faceid-plusv2"
    value = back.value
    assert isinstance(value, ReferenceTokens) and value.per_person is True
    assert value.cond.dtype == dtype and torch.equal(value.cond, tokens.cond)
    assert torch.equal(value.uncond, tokens.uncond)
    got = value.identities[0]
    assert got.embedding.dtype == np.float32 and np.array_equal(got.embedding, identity.embedding)
    assert got.kps.dtype == np.float64 and np.array_equal(got.kps, identity.kps)
    assert got.image_size == (64, 48) and got.photo == 1
    assert got.face_crop.mode == "RGB" and np.array_equal(np.asarray(got.face_crop), np.asarray(crop))


def test_codec_round_trips_instantcharacter_features():
    from idcraft.instantcharacter.encoders import SubjectFeatures

    features = SubjectFeatures(torch.randn(1, 6, 5), torch.randn(1, 2, 5), torch.randn(1, 8, 5).half())
    back = codec.decode(codec.encode(Conditioning("instantcharacter", features))).value
    assert isinstance(back, SubjectFeatures)
    assert (
        torch.equal(back.high_res_deep, features.high_res_deep) and back.high_res_deep.dtype == torch.float16
    )


def test_codec_builds_only_idcraft_dataclasses():
    from safetensors.torch import save

    tree = '{"version": 1, "method": "ip-adapter", "value": {"dataclass": "subprocess:Popen", "fields": {}}}'
    with pytest.raises(codec.CodecError, match="not one of idcraft's dataclasses"):
        codec.decode(save({}, metadata={codec.META: tree}))
    with pytest.raises(codec.CodecError, match="without idcraft's conditioning metadata"):
        codec.decode(save({"x": torch.zeros(1)}))
    with pytest.raises(codec.CodecError):
        codec.encode(Conditioning("ip-adapter", {"x": object()}))


def test_folder_store_is_bounded_evicts_the_least_recently_used_and_survives_a_restart(tmp_path):
    store = FolderStore(tmp_path, "refs", max_entries=3, max_bytes=100)
    for n in range(3):
        assert store.put(key(n), bytes([n]) * 10)
    os.utime(store._path(key(0)), (1, 1))  # key 0 is the oldest... until it is read
    os.utime(store._path(key(1)), (2, 2))
    os.utime(store._path(key(2)), (3, 3))
    assert store.get(key(0)) == bytes([0]) * 10
    assert store.put(key(3), b"x" * 10)
    assert store.get(key(1)) is None and store.get(key(0)) is not None
    assert store.stats() == (3, 30)
    assert not store.put(key(9), b"x" * 101) and store.get(key(9)) is None  # alone over the bound
    assert store.put(key(4), b"y" * 80)  # over the byte bound with the others: the oldest go
    assert store.stats()[1] <= 100 and store.get(key(4)) == b"y" * 80
    assert not [p for p in tmp_path.rglob("*") if p.name.startswith(".")]  # no temporary file left
    again = FolderStore(tmp_path, "refs", max_entries=3, max_bytes=100)  # a restart: what was kept is there
    assert again.get(key(4)) == b"y" * 80 and again.stats() == store.stats()


def test_folder_store_refuses_a_folder_it_cannot_write(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with pytest.raises(IdcraftError, match=f"cannot open the store {blocker}/sub"):
        open_stores(ServerConfig(store=str(blocker / "sub")))


def test_redis_store_is_bounded_and_shared(redis):
    from idcraft.serve.stores.redis_store import RedisStore, connect

    one = RedisStore(connect(redis.url), redis.url, "ns", max_entries=3, max_bytes=100)
    two = RedisStore(connect(redis.url), redis.url, "ns", max_entries=3, max_bytes=100)
    for n in range(3):
        assert one.put(key(n), bytes([n]) * 10)
    assert two.get(key(0)) == bytes([0]) * 10  # another client (replica) reads it, and makes it recent
    assert two.put(key(3), b"x" * 10)
    assert one.get(key(1)) is None and one.get(key(0)) is not None
    assert one.stats() == (3, 30)
    assert not one.put(key(9), b"x" * 101)
    assert one.put(key(4), b"y" * 80)
    entries, total = two.stats()
    assert total <= 100 and one.get(key(4)) == b"y" * 80
    other = RedisStore(connect(redis.url), redis.url, "other", max_entries=3, max_bytes=100)
    assert other.get(key(4)) is None and other.stats() == (0, 0)  # namespaces are apart


def test_store_kind_and_config():
    assert store_kind("memory") == "memory"
    assert store_kind("redis://cache:6379/0") == "redis"
    assert store_kind("/mnt/idcraft") == "folder"
    with pytest.raises(IdcraftError, match="unknown kind of store"):
        store_kind("s3://bucket")
    config = config_from_dict({"server": {"store": "redis://h:1/0"}, "ray": {"replicas": 2, "num_gpus": 0}})
    assert config.server.store == "redis://h:1/0" and config.ray.replicas == 2 and config.ray.num_gpus == 0
    with pytest.raises(IdcraftError, match="ray.replicas must be at least 1"):
        config_from_dict({"ray": {"replicas": 0}})
    with pytest.raises(IdcraftError, match="ray: unknown key"):
        config_from_dict({"ray": {"replica": 2}})


def test_a_redis_store_not_there_at_start_is_a_one_line_error():
    pytest.importorskip("redis")
    url = f"redis://127.0.0.1:{free_port()}/0"  # nothing listens there
    with pytest.raises(IdcraftError) as caught:
        open_stores(ServerConfig(store=url, store_retry_s=1))
    message = str(caught.value)
    assert message.startswith(f"cannot reach the Redis store {url}") and "\n" not in message
    assert "another --store" in message


def test_the_models_fingerprint_reads_file_contents_not_paths(tmp_path):
    from idcraft.serve.cache import identity_key
    from idcraft.serve.stores.fingerprint import path_sample

    for folder in ("a", "b"):
        (tmp_path / folder / "sub").mkdir(parents=True)
        (tmp_path / folder / "sub" / "weights.bin").write_bytes(b"\0" * 4096)
    assert path_sample(tmp_path / "a") == path_sample(tmp_path / "b")  # the same files on another mount
    (tmp_path / "b" / "sub" / "weights.bin").write_bytes(b"\0" * 4095 + b"\1")  # one weight changed
    assert path_sample(tmp_path / "a") != path_sample(tmp_path / "b")
    assert path_sample("org/model-on-the-hub") == "org/model-on-the-hub"
    assert identity_key("ip-adapter", ["r"], models="one") != identity_key("ip-adapter", ["r"], models="two")


def test_serve_flags_refuse_what_cannot_work_in_one_line(capsys):
    from idcraft.cli import main

    pytest.importorskip("redis")
    url = f"redis://127.0.0.1:{free_port()}/0"
    assert main(["serve", "--store", url, "--check"]) == 2  # refused before any model loads
    assert main(["serve", "--replicas", "2"]) == 2
    assert main(["serve", "--store", "s3://bucket/x"]) == 2
    errors = capsys.readouterr().err.strip().splitlines()
    assert len(errors) == 3, errors
    assert f"cannot reach the Redis store {url}" in errors[0]
    assert "--replicas needs --ray" in errors[1] and "unknown kind of store" in errors[2]
