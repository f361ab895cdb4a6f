"""Identities: a fixed, balanced, well-separated table and a held-out split that training never sees."""

from __future__ import annotations

import hashlib
import json
from collections import Counter

import pytest

from idcraft.errors import IdcraftError
from idcraft.world import (
    ATTRIBUTES,
    HELD_OUT_IDS,
    NUM_IDENTITIES,
    Identity,
    all_identities,
    held_out_ids,
    identity_from_id,
    train_ids,
)
from idcraft.world.identity import MIN_FINE_DISTANCE, NUM_CLASSES, PER_CLASS, fine_distance

#: Digest of the whole identity table. Trained models and held-out scores depend on it: change it only
#: on purpose (and retrain), never by accident.
TABLE_DIGEST = "2682ae07101954c04eee890c2a7caa343e47cddf508bd6efd3ad0b9f37f2f296"


def test_table_is_pinned():
    table = json.dumps([i.to_dict() for i in all_identities()])
    assert hashlib.sha256(table.encode()).hexdigest() == TABLE_DIGEST


def test_ids_are_unique_balanced_and_well_separated():
    ids = all_identities()
    assert len(ids) == NUM_IDENTITIES >= 500
    assert [i.id for i in ids] == list(range(NUM_IDENTITIES))
    assert len({tuple(i.attributes().items()) for i in ids}) == NUM_IDENTITIES
    assert set(Counter(i.coarse_class for i in ids).values()) == {PER_CLASS}
    by_class: dict[int, list[Identity]] = {}
    for identity in ids:
        by_class.setdefault(identity.coarse_class, []).append(identity)
    for members in by_class.values():
        for k, a in enumerate(members):
            assert all(fine_distance(a, b) >= MIN_FINE_DISTANCE for b in members[k + 1 :])
    # every value of every attribute is used
    for name, values in ATTRIBUTES.items():
        assert {getattr(i, name) for i in ids} == set(values), name
    # neighbouring ids never share a coarse class
    assert all(ids[k].coarse_class != ids[k + 1].coarse_class for k in range(NUM_IDENTITIES - 1))


def test_held_out_split():
    train = train_ids()
    assert not set(train) & HELD_OUT_IDS
    assert set(train) | HELD_OUT_IDS == set(range(NUM_IDENTITIES))
    assert len(HELD_OUT_IDS) == NUM_IDENTITIES // 10
    assert held_out_ids() == tuple(sorted(HELD_OUT_IDS))
    # every coarse class is present on both sides, so held-out scores measure fine-detail transfer
    held_classes = Counter(identity_from_id(i).coarse_class for i in HELD_OUT_IDS)
    assert len(held_classes) == NUM_CLASSES and set(held_classes.values()) == {2}


def test_identity_validation_and_round_trip():
    identity = identity_from_id(17)
    assert Identity.from_dict(identity.to_dict()) == identity
    assert identity.attributes() == {**identity.coarse(), **identity.fine()}
    with pytest.raises(IdcraftError):
        identity_from_id(NUM_IDENTITIES)
    with pytest.raises(IdcraftError):
        Identity(shape="blob", colour="red")
    with pytest.raises(IdcraftError):
        Identity(shape="round", colour="red", pattern="stripes")  # a pattern needs a pattern colour


#: Digest of the first 2000 crowd identities. A recogniser trained on the crowd depends on it (the shipped
#: one predates the crowd): change it only on purpose.
CROWD_DIGEST = "2a16ed3211019b786532ba75d2a29e18c6945dc3b2bff94df7bf1fd1b1216abe"


def test_crowd_is_pinned_new_and_kept_away_from_the_held_out_ids():
    from idcraft.world.identity import crowd_identity, crowd_ids, resolve_identity

    crowd = [resolve_identity(i) for i in crowd_ids(2000)]
    assert [c.id for c in crowd] == list(range(NUM_IDENTITIES, NUM_IDENTITIES + 2000))
    assert crowd[5] == crowd_identity(5)
    assert hashlib.sha256(json.dumps([c.to_dict() for c in crowd]).encode()).hexdigest() == CROWD_DIGEST
    table = {tuple(i.attributes().values()) for i in all_identities()}
    keys = [tuple(c.attributes().values()) for c in crowd]
    assert len(set(keys)) == len(keys) and not set(keys) & table
    held = [identity_from_id(i) for i in HELD_OUT_IDS]
    assert all(
        fine_distance(h, c) >= MIN_FINE_DISTANCE
        for c in crowd
        for h in held
        if h.coarse_class == c.coarse_class
    )
    assert len({c.coarse_class for c in crowd}) == NUM_CLASSES  # every class is in the crowd
    for name, values in ATTRIBUTES.items():  # and every value of every attribute
        assert {c.attributes()[name] for c in crowd} == set(values), name
    with pytest.raises(IdcraftError):
        identity_from_id(NUM_IDENTITIES)  # the table stays the table: only renderers resolve crowd ids


def test_adapter_datasets_refuse_crowd_ids(tmp_path):
    from idcraft.world.dataset import write_dataset
    from idcraft.world.identity import crowd_ids

    with pytest.raises(IdcraftError, match="identity id 960"):
        write_dataset(tmp_path, 2, ids=crowd_ids(1))
    assert not (tmp_path / "images").exists()
