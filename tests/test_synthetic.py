"""The synthetic re-ID world: determinism, the Market/LUPerson/VeRi protocols, image format, views, difficulty."""

from __future__ import annotations

import collections
import dataclasses
import io
import json
import multiprocessing
import re
from concurrent.futures import ProcessPoolExecutor

import numpy as np
import pytest
from omegaconf import OmegaConf
from PIL import Image

from reidforge.data.source import RecordSource
from reidforge.data.synthetic import (
    PERSON_COLORS,
    PERSON_DATASET,
    POOL_DATASET,
    VEHICLE_DATASET,
    SyntheticConfig,
    _paint_person,
    _paint_vehicle,
    build_sources,
    draw_person,
    draw_vehicle,
    person_identity,
)

SMALL = dict(train_ids=20, test_ids=10, distractors=15, pool_images=200, pool_images_per_id=5,
             pool_ids_per_video=4, vehicle_train_ids=8, vehicle_test_ids=6, images_per_vehicle_id=8,
             vehicle_height=96, vehicle_width=112)
MARKET_KEY = re.compile(r"^\d{4}_c\d+s1_\d{6}_00$")
VERI_KEY = re.compile(r"^\d{4}_c\d{3}_\d{8}_0$")
LUP_KEY = re.compile(r"^\d{2}_\d{2}_\d{4}_\d{8}$")


@pytest.fixture(scope="module")
def world() -> dict:
    return build_sources(SyntheticConfig(**SMALL))


def _splits(world: dict):
    for dataset, splits in world.items():
        for split, src in splits.items():
            yield dataset, split, src


def _sample(n: int, k: int = 6) -> list[int]:
    return sorted({int(i) for i in np.linspace(0, n - 1, k)})


def _metas(src) -> list[dict]:
    return [src.meta(i) for i in range(len(src))]


def test_splits_are_record_sources(world):
    assert {d: set(s) for d, s in world.items()} == {
        PERSON_DATASET: {"train", "query", "gallery"}, POOL_DATASET: {"pool"},
        VEHICLE_DATASET: {"train", "query", "gallery"}}
    for dataset, split, src in _splits(world):
        assert isinstance(src, RecordSource)
        assert (src.dataset, src.split) == (dataset, split)
        assert len(src) > 0


def test_same_config_gives_same_records_in_any_order(world):
    again = build_sources(SyntheticConfig(**SMALL))
    for dataset, split, src in _splits(world):
        idx = _sample(len(src))
        forward = [(src.key(i), src.meta(i), src.image(i)) for i in idx]
        backward = [(again[dataset][split].key(i), again[dataset][split].meta(i), again[dataset][split].image(i))
                    for i in reversed(idx)][::-1]
        assert forward == backward


def test_pickled_sources_render_the_same_bytes_in_a_fresh_process(world):
    jobs = [(src, i) for _, _, src in _splits(world) for i in _sample(len(src), 2)]
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        # Bound methods pickle their source, so the worker renders from a pickled copy.
        futures = [(pool.submit(src.key, i), pool.submit(src.meta, i), pool.submit(src.image, i)) for src, i in jobs]
        remote = [tuple(f.result() for f in fs) for fs in futures]
    assert remote == [(src.key(i), src.meta(i), src.image(i)) for src, i in jobs]


def test_another_seed_gives_other_images(world):
    other = build_sources(SyntheticConfig(**{**SMALL, "seed": 1}))
    for dataset, split, src in _splits(world):
        assert [src.image(i) for i in range(3)] != [other[dataset][split].image(i) for i in range(3)]


def test_keys_are_unique_and_path_safe(world):
    keys = [src.key(i) for _, _, src in _splits(world) for i in range(len(src))]
    assert len(keys) == len(set(keys))
    assert not any("." in k or "/" in k for k in keys)


def _check_query_gallery(query: list[dict], gallery: list[dict]) -> None:
    g_by_pid = collections.defaultdict(set)
    for m in gallery:
        g_by_pid[m["pid"]].add(m["camid"])
    pairs = [(m["pid"], m["camid"]) for m in query]
    assert len(pairs) == len(set(pairs)), "at most one query per (identity, camera)"
    for pid, cam in pairs:
        assert g_by_pid[pid] - {cam}, f"query {pid} in camera {cam} has no cross-camera gallery match"
    assert all(len(cams) >= 2 for pid, cams in g_by_pid.items() if pid != 0), "test ids span >= 2 cameras"


def test_person_splits_follow_market1501(world):
    cfg = SyntheticConfig(**SMALL)
    person = world[PERSON_DATASET]
    train, query, gallery = (_metas(person[s]) for s in ("train", "query", "gallery"))
    for split in ("train", "query", "gallery"):
        assert all(MARKET_KEY.match(person[split].key(i)) for i in range(len(person[split])))
    train_pids = {m["pid"] for m in train}
    test_pids = {m["pid"] for m in query}
    assert len(train_pids) == cfg.train_ids and len(test_pids) == cfg.test_ids
    assert not train_pids & ({m["pid"] for m in gallery} | test_pids)
    assert {m["pid"] for m in gallery} == test_pids | {0}
    assert min(train_pids | test_pids) >= 1
    distractors = [m for m in gallery if m["pid"] == 0]
    assert len(distractors) == cfg.distractors
    assert all(m["distractor"] in ("background", "partial") and m["viewid"] is None for m in distractors)
    assert all(m["distractor"] == "none" and m["viewid"] in (0, 1, 2) for m in train + query + gallery if m["pid"])
    assert all(0 <= m["camid"] < cfg.cameras for m in train + query + gallery)
    _check_query_gallery(query, gallery)
    key = person["gallery"].key(0)
    assert key.startswith("0000_c") and int(key[6]) == gallery[0]["camid"] + 1


def test_vehicle_splits_follow_veri776(world):
    vehicle = world[VEHICLE_DATASET]
    train, query, gallery = (_metas(vehicle[s]) for s in ("train", "query", "gallery"))
    for split in ("train", "query", "gallery"):
        assert all(VERI_KEY.match(vehicle[split].key(i)) for i in range(len(vehicle[split])))
    assert not {m["pid"] for m in train} & {m["pid"] for m in query + gallery}
    assert all(0 <= m["camid"] < 20 and 0 <= m["viewid"] < 8 for m in train + query + gallery)
    assert all(isinstance(m["color"], str) and isinstance(m["type"], str) for m in train)
    _check_query_gallery(query, gallery)


def test_pool_is_luperson_like(world):
    pool = world[POOL_DATASET]["pool"]
    metas = _metas(pool)
    assert len(pool) == SMALL["pool_images"]
    assert all(LUP_KEY.match(pool.key(i)) for i in range(len(pool)))
    assert all(m["pid"] is None and m["camid"] is None and m["viewid"] is None for m in metas)
    videos_of = collections.defaultdict(set)
    for m in metas:
        videos_of[m["hidden_pid"]].add(m["hidden_camid"])
    assert all(len(v) == 1 for v in videos_of.values()), "an identity lives in one video"
    ids_per_video = collections.Counter(next(iter(v)) for v in videos_of.values())
    assert max(ids_per_video.values()) >= 2, "videos hold several identities"
    labeled = {person_identity(0, PERSON_DATASET, pid) for pid in range(1, 31)}
    assert not labeled & {person_identity(0, POOL_DATASET, pid) for pid in videos_of}


def test_meta_is_json_with_one_schema_per_split(world):
    for _, _, src in _splits(world):
        metas = _metas(src)
        json.dumps(metas)
        assert all(m.keys() == metas[0].keys() for m in metas)
        assert {"pid", "camid", "viewid", "source"} <= metas[0].keys()


def test_images_are_jpegs_of_the_configured_size(world):
    sizes = {PERSON_DATASET: (64, 128), POOL_DATASET: (64, 128), VEHICLE_DATASET: (112, 96)}
    for dataset, _, src in _splits(world):
        for i in _sample(len(src), 3):
            data, ext = src.image(i)
            img = Image.open(io.BytesIO(data))
            assert (ext, img.format, img.mode, img.size) == ("jpg", "JPEG", "RGB", sizes[dataset])


def test_colour_alone_does_not_identify():
    world = build_sources(SyntheticConfig(test_ids=60, vehicle_test_ids=60, pool_images=10))
    for dataset, colours in ((PERSON_DATASET, ("top_color", "bottom_color")), (VEHICLE_DATASET, ("color", "type"))):
        by_pid = {m["pid"]: tuple(m[c] for c in colours) for m in _metas(world[dataset]["query"])}
        counts = collections.Counter(by_pid.values())
        shared = sum(counts[c] > 1 for c in by_pid.values()) / len(by_pid)
        assert shared >= 0.3, f"{dataset}: only {shared:.0%} of test ids share {colours} with another id"


def _person_pixels(person, view: int, rgb) -> np.ndarray:
    canvas = np.zeros((128, 64, 3), np.float32)
    _paint_person(canvas, person, view, 32.0, 8.0, 112.0, False, 0.05, 0.0)
    return np.argwhere((canvas == np.asarray(rgb, np.float32)).all(-1))


def test_views_change_what_a_person_shows():
    base = dataclasses.replace(draw_person(np.random.default_rng(0)), top_color="gray", top_pattern="logo",
                               top_color2="red", backpack="green", handbag="left", handbag_color="pink",
                               bottom_color="black", shoe_color="black", hat="none", shade=(0.0, 0.0, 0.0))
    red, green, pink = (PERSON_COLORS[c][0] for c in ("red", "green", "pink"))
    front, back, side = (0, 1, 2)
    assert len(_person_pixels(base, front, red)) > 0
    assert len(_person_pixels(base, back, red)) == len(_person_pixels(base, side, red)) == 0
    assert len(_person_pixels(base, back, green)) > 2 * len(_person_pixels(base, front, green)) > 0
    assert len(_person_pixels(base, side, green)) > 0
    # A bag on the left hip is on the image right from the front and on the image left from the back.
    assert _person_pixels(base, front, pink)[:, 1].mean() > 32 > _person_pixels(base, back, pink)[:, 1].mean()


def test_views_change_what_a_vehicle_shows():
    veh = dataclasses.replace(draw_vehicle(np.random.default_rng(0)), color="white", type="sedan", decal="left",
                              decal_color="green", stripe="none", two_tone=False)
    visible = []
    for view in range(8):
        canvas = np.zeros((96, 96, 3), np.float32)
        _paint_vehicle(canvas, veh, -view * np.pi / 4, 0.3, 48.0, 48.0, 0.9)
        r, g, b = canvas[..., 0], canvas[..., 1], canvas[..., 2]
        visible.append(int(((g > 1.6 * r) & (g > 1.4 * b) & (g > 40)).sum()) > 0)
    # Bins 5-7 (rear-left, left, front-left) show the vehicle's left side, the others do not.
    assert visible == [False, False, False, False, False, True, True, True]


def test_build_sources_takes_omegaconf_and_checks_cameras(world):
    node = OmegaConf.structured(SyntheticConfig(**SMALL))
    from_node = build_sources(node)
    for dataset, split, src in _splits(world):
        assert [src.key(i) for i in range(len(src))] == [from_node[dataset][split].key(i) for i in range(len(src))]
    with pytest.raises(ValueError):
        build_sources(SyntheticConfig(**{**SMALL, "cameras": 1}))


def test_indices_outside_the_source_raise(world):
    src = world[PERSON_DATASET]["train"]
    for i in (-1, len(src)):
        with pytest.raises(IndexError):
            src.key(i)
        with pytest.raises(IndexError):
            src.image(i)
