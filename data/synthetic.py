"""The synthetic re-ID world: procedurally rendered pedestrians and vehicles seen by simulated cameras.

It stands in for real re-ID datasets in tests, smoke runs and benchmarks, with the same protocols:

* ``synthetic_person`` follows Market-1501. Train and test identities are disjoint; pids are raw
  1-based ints, camids 0-based; keys read ``{pid:04d}_c{camid+1}s1_{frame:06d}_00``. Every test
  identity is seen by at least 2 cameras with at least 2 images each; the query holds one image per
  (test identity, camera) for a random subset of its cameras, the gallery every other test image
  plus ``distractors`` pid-0 boxes (empty background or a badly cropped passer-by, viewid None).
  So every query has a gallery match in another camera.
* ``synthetic_lup`` is an unlabeled LUPerson-like pool; keys read
  ``{country:02d}_{city:02d}_{video:04d}_{img:08d}`` (city within the country, video within the
  city, img over the pool). Each video is one street camera and holds several identities, each
  identity lives in one video. Meta has pid, camid and viewid None and hides the truth for
  evaluating clustering: ``hidden_pid``, ``hidden_camid`` (= ``video``, the video's index over the
  pool) and ``hidden_viewid``. Pool identities are drawn apart from the labeled ones.
* ``synthetic_vehicle`` follows VeRi-776: ``vehicle_cameras`` (20) cameras, keys
  ``{vid:04d}_c{camid+1:03d}_{frame:08d}_0``, viewid is one of VeRi's 8 orientation bins (0 front,
  1 front-right, 2 right, 3 rear-right, 4 rear, 5 rear-left, 6 left, 7 front-left); query and
  gallery are split as for persons, without distractors.

Identities. A person is a top (colour; solid, horizontal or vertical stripes, checks, a chest logo
or an open jacket over a second colour; long or short sleeves), a bottom (colour; trousers, shorts or
skirt), shoe colour, hair colour and style, skin tone, hat, backpack, handbag (and the side it hangs
on) and body height and build. A vehicle is a body colour, a VeRi type (sedan, suv, van, ...), window
tint, roof items, a two-tone roof, a side stripe, windshield stickers, a decal on one side or the
rear, rim colour and, for trucks, a cargo box colour. Colours come from small palettes with skewed
frequencies, so many identities share their colours and differ only in pattern, accessories, hair or
shape: colour alone does not identify. Labeled meta carries these attributes as plain strings, ints
and bools, plus the image's occlusion (and, for persons, the distractor kind).

Views change what is visible. Persons are seen from the front, back or side (viewid 0, 1, 2): a
backpack shows its body from the back, its straps from the front and its profile from the side; the
logo and the open jacket only show from the front; the face from the front, hair from the back; a
handbag hangs on a fixed side of the body. Vehicles are orthographic projections of a few prisms
(body, cabin, cargo box, roof items) at the azimuth of their bin and the camera's elevation, so
headlights, windshield stickers, tail lights, side stripes and decals appear only in matching bins.

Cameras. Each camera (each video in the pool) has fixed parameters drawn from the seed:

* background: a street (wall with windows and shop fronts, paved floor) or a road (asphalt, lane
  marks, verge), a quarter larger than the crop so that each image pans to a random offset;
* light: brightness, per-channel gain (colour cast), a vertical illumination gradient and a gamma;
* optics: Gaussian blur radius and sensor noise;
* framing: the subject's scale in the crop, the scale jitter and the position jitter;
* viewpoint distribution (persons: any mix of front/back/side; vehicles: mostly one traffic
  direction, its neighbours and the opposite lane) and, for vehicles, the elevation angle;
* occlusion probability. An occluded image gets a pole, an object rising from the bottom, a
  passer-by in front of the subject, or a bad crop (the legs of a person, a side of a vehicle).

Each image adds its own jitter on top (brightness, white balance, blur, pose, placement).

Determinism. All randomness comes from ``np.random.default_rng`` seeded with the config seed and
integer codes: identities from (seed, dataset, pid), cameras from (seed, dataset, camera), the split
plan from (seed, dataset) and each image from (seed, dataset, split, index). The same config thus
gives the same keys, meta and JPEG bytes in any process and call order. Sources only hold the
per-index plan as numpy arrays, so they are cheap to build and to pickle; ``image(i)`` renders.
"""

from __future__ import annotations

import io
import math
import operator
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from dataclasses import dataclass, fields
from functools import lru_cache
from typing import Any

import numpy as np
from PIL import Image, ImageFilter

from reidforge.data.source import DatasetAdapter, RecordSource, register

PERSON_DATASET = "synthetic_person"
POOL_DATASET = "synthetic_lup"
VEHICLE_DATASET = "synthetic_vehicle"

PERSON_VIEWS = ("front", "back", "side")
VEHICLE_VIEWS = ("front", "front_right", "right", "rear_right", "rear", "rear_left", "left", "front_left")
OCCLUSIONS = ("none", "pole", "object", "passerby", "crop")
DISTRACTORS = ("none", "background", "partial")

# Bump when rendering changes, so that resumed builds do not reuse shards of the old renderer.
RENDER_VERSION = 1

_DATASET_CODE = {PERSON_DATASET: 1, POOL_DATASET: 2, VEHICLE_DATASET: 3}
_SPLIT_CODE = {"train": 0, "query": 1, "gallery": 2, "pool": 3}
# Separate random streams, so that e.g. more images per identity never changes the identities.
_PLAN, _IDENTITY, _CAMERA, _IMAGE = 0, 1, 2, 3
# How an occluded image is occluded (indices into OCCLUSIONS[1:]).
_OCCLUSION_MIX = np.array([0.25, 0.25, 0.25, 0.25])
_QUERY_CAMERA_PROB = 0.5  # chance that a camera of a test identity contributes a query image


@dataclass
class SyntheticConfig:
    """Size and difficulty of the synthetic world; every count scales independently."""

    seed: int = 0
    height: int = 128  # person crops, like Market-1501's 128x64
    width: int = 64
    vehicle_height: int = 128  # vehicle crops: square, VeRi boxes are roughly as wide as high
    vehicle_width: int = 128
    jpeg_quality: int = 90
    # Labeled persons (Market-1501 protocol); image counts are per-identity averages.
    train_ids: int = 150
    images_per_train_id: int = 12
    test_ids: int = 100
    images_per_test_id: int = 12
    cameras: int = 6
    distractors: int = 200
    # Unlabeled LUPerson-like pool.
    pool_images: int = 20000
    pool_images_per_id: int = 10
    pool_ids_per_video: int = 8
    pool_videos_per_city: int = 8
    pool_cities_per_country: int = 5
    # Vehicles (VeRi-776 protocol).
    vehicle_train_ids: int = 100
    vehicle_test_ids: int = 50
    vehicle_cameras: int = 20
    images_per_vehicle_id: int = 12
    # Difficulty.
    occlusion: float = 0.15  # mean probability that an image is occluded or badly cropped
    light_variation: float = 1.0  # scales the spread of camera brightness, colour cast and gamma
    blur: float = 1.0  # scales the camera blur radii


# ---------------------------------------------------------------------------------------------
# Palettes: (rgb, frequency). Frequencies are skewed like real street clothing and traffic.

Palette = dict[str, tuple[tuple[int, int, int], float]]

PERSON_COLORS: Palette = {
    "black": ((35, 35, 38), 0.20),
    "white": ((225, 225, 220), 0.12),
    "gray": ((128, 128, 130), 0.14),
    "blue": ((45, 75, 160), 0.14),
    "red": ((185, 40, 45), 0.09),
    "green": ((55, 125, 65), 0.07),
    "yellow": ((220, 195, 60), 0.05),
    "brown": ((115, 78, 48), 0.08),
    "pink": ((228, 148, 172), 0.06),
    "purple": ((110, 60, 145), 0.05),
}
_BOTTOM_FREQ = {"black": 0.30, "blue": 0.26, "gray": 0.15, "brown": 0.09, "white": 0.05, "green": 0.04,
                "red": 0.03, "pink": 0.03, "purple": 0.02, "yellow": 0.03}
_SHOE_FREQ = {"black": 0.40, "white": 0.30, "gray": 0.15, "brown": 0.15}
_BAG_FREQ = {"black": 0.35, "gray": 0.15, "blue": 0.15, "brown": 0.15, "red": 0.08, "green": 0.06, "pink": 0.06}
HAIR_COLORS: Palette = {
    "black": ((25, 22, 20), 0.45),
    "brown": ((88, 58, 36), 0.28),
    "blonde": ((200, 170, 110), 0.14),
    "gray": ((155, 155, 152), 0.08),
    "auburn": ((140, 62, 32), 0.05),
}
SKIN_TONES = ((238, 205, 178), (222, 180, 145), (190, 140, 100), (140, 95, 62), (95, 62, 42))
_TOP_PATTERNS = {"solid": 0.38, "hstripes": 0.13, "vstripes": 0.09, "checks": 0.09, "logo": 0.17, "open_jacket": 0.14}
_BOTTOM_TYPES = {"trousers": 0.7, "shorts": 0.18, "skirt": 0.12}
_HAIR_STYLES = {"short": 0.47, "long": 0.25, "ponytail": 0.18, "bald": 0.10}

VEHICLE_COLORS: Palette = {  # VeRi-776's ten colours
    "white": ((228, 228, 225), 0.25),
    "black": ((28, 28, 30), 0.20),
    "gray": ((125, 127, 130), 0.16),
    "red": ((170, 28, 32), 0.09),
    "blue": ((35, 65, 150), 0.09),
    "yellow": ((225, 190, 35), 0.05),
    "green": ((45, 115, 60), 0.04),
    "brown": ((105, 70, 45), 0.04),
    "golden": ((185, 155, 85), 0.04),
    "orange": ((225, 115, 35), 0.04),
}
_CARGO_FREQ = {"white": 0.3, "gray": 0.2, "blue": 0.2, "green": 0.1, "red": 0.1, "yellow": 0.1}
_STICKER_RGB = np.array([(40, 90, 200), (235, 235, 235), (60, 170, 80), (230, 200, 50)], np.float32)
_GLASS_RGB = {"light": np.array((105, 125, 135), np.float32), "dark": np.array((32, 36, 42), np.float32)}


def _rgb(palette: Palette, name: str, shade: tuple[float, ...] = (0.0, 0.0, 0.0)) -> np.ndarray:
    return np.clip(np.asarray(palette[name][0], np.float32) + np.asarray(shade, np.float32), 0, 255)


def _pick(rng: np.random.Generator, freq: dict[str, float], exclude: str = "") -> str:
    names = [k for k in freq if k != exclude]
    p = np.array([freq[k] for k in names])
    return names[int(rng.choice(len(names), p=p / p.sum()))]


def _freq(palette: Palette) -> dict[str, float]:
    return {name: f for name, (_, f) in palette.items()}


# ---------------------------------------------------------------------------------------------
# Identities


@dataclass(frozen=True)
class PersonIdentity:
    """What a person wears and looks like; fixed across cameras."""

    top_color: str
    top_pattern: str
    top_color2: str  # stripes, checks, logo or inner shirt of an open jacket
    sleeves: str
    bottom_color: str
    bottom_type: str
    shoe_color: str
    hair_color: str
    hair_style: str
    skin: int
    hat: str  # "none" or a colour
    backpack: str  # "none" or a colour
    handbag: str  # "none", "left" or "right": the side of the body it hangs on
    handbag_color: str
    height: float  # relative to the average person
    build: float  # relative body width
    detail: float  # stripe period / logo size, in body heights
    shade: tuple[float, float, float]  # the identity's dye lot: a small offset of all garment colours

    def attributes(self) -> dict[str, Any]:
        """JSON-serialisable attributes, as stored in meta."""
        build = "slim" if self.build < 0.94 else "broad" if self.build > 1.07 else "average"
        return {"top_color": self.top_color, "top_pattern": self.top_pattern, "top_color2": self.top_color2,
                "sleeves": self.sleeves, "bottom_color": self.bottom_color, "bottom_type": self.bottom_type,
                "shoe_color": self.shoe_color, "hair_color": self.hair_color, "hair_style": self.hair_style,
                "skin": self.skin, "hat": self.hat, "backpack": self.backpack, "handbag": self.handbag,
                "handbag_color": self.handbag_color, "height_cm": int(round(170 * self.height)), "build": build}


PERSON_ATTRIBUTES = ("top_color", "top_pattern", "top_color2", "sleeves", "bottom_color", "bottom_type",
                     "shoe_color", "hair_color", "hair_style", "skin", "hat", "backpack", "handbag",
                     "handbag_color", "height_cm", "build")


def draw_person(rng: np.random.Generator) -> PersonIdentity:
    """A random person identity."""
    top = _pick(rng, _freq(PERSON_COLORS))
    return PersonIdentity(
        top_color=top,
        top_pattern=_pick(rng, _TOP_PATTERNS),
        top_color2=_pick(rng, _freq(PERSON_COLORS), exclude=top),
        sleeves="long" if rng.random() < 0.6 else "short",
        bottom_color=_pick(rng, _BOTTOM_FREQ),
        bottom_type=_pick(rng, _BOTTOM_TYPES),
        shoe_color=_pick(rng, _SHOE_FREQ),
        hair_color=_pick(rng, _freq(HAIR_COLORS)),
        hair_style=_pick(rng, _HAIR_STYLES),
        skin=int(rng.integers(len(SKIN_TONES))),
        hat=_pick(rng, _freq(PERSON_COLORS)) if rng.random() < 0.15 else "none",
        backpack=_pick(rng, _BAG_FREQ) if rng.random() < 0.3 else "none",
        handbag=("left", "right")[int(rng.integers(2))] if rng.random() < 0.25 else "none",
        handbag_color=_pick(rng, _BAG_FREQ),
        height=float(np.clip(rng.normal(1.0, 0.045), 0.88, 1.1)),
        build=float(np.clip(rng.normal(1.0, 0.08), 0.82, 1.22)),
        detail=float(rng.uniform(0.035, 0.06)),
        shade=tuple(float(s) for s in rng.normal(0.0, 7.0, 3)),
    )


@dataclass(frozen=True)
class VehicleIdentity:
    """One vehicle: its colour, type and the small marks that tell same-model cars apart."""

    color: str
    type: str
    window_tint: str  # "light" or "dark"
    roof: str  # "none", "rack", "light_bar" or "box"
    two_tone: bool  # black roof
    stripe: str  # "none" or the colour of a stripe along both sides
    stickers: int  # inspection stickers in a top corner of the windshield
    sticker_side: str  # "left" or "right" corner (vehicle's left)
    decal: str  # "none", "left", "right" or "rear": a mark seen only from that side
    decal_color: str
    rim: str  # "silver" or "black"
    cargo_color: str  # trucks' box; the body colour otherwise
    scale: float  # small size variation between models of a type
    shade: tuple[float, float, float]

    def attributes(self) -> dict[str, Any]:
        """JSON-serialisable attributes, as stored in meta."""
        return {"color": self.color, "type": self.type, "window_tint": self.window_tint, "roof": self.roof,
                "two_tone": self.two_tone, "stripe": self.stripe, "stickers": self.stickers,
                "sticker_side": self.sticker_side, "decal": self.decal, "decal_color": self.decal_color,
                "rim": self.rim, "cargo_color": self.cargo_color}


@dataclass(frozen=True)
class _VehicleShape:
    length: float  # metres
    half_width: float
    clearance: float  # bottom of the body above the road
    belt: float  # top of the body (bottom of the windows)
    roof: float
    cabin_bottom: tuple[float, float]  # cabin rear/front at the belt, fractions of length from the rear
    cabin_top: tuple[float, float]  # ... and at the roof
    wheels: tuple[float, ...]  # wheel centres, fractions of length from the rear
    frequency: float


VEHICLE_TYPES: dict[str, _VehicleShape] = {  # VeRi-776's nine types
    "sedan": _VehicleShape(4.6, 0.90, 0.30, 0.95, 1.45, (0.22, 0.70), (0.32, 0.58), (0.18, 0.80), 0.33),
    "suv": _VehicleShape(4.7, 0.95, 0.42, 1.12, 1.80, (0.05, 0.74), (0.08, 0.62), (0.18, 0.80), 0.17),
    "hatchback": _VehicleShape(4.0, 0.87, 0.30, 0.95, 1.50, (0.03, 0.68), (0.08, 0.55), (0.17, 0.80), 0.10),
    "mpv": _VehicleShape(4.8, 0.92, 0.32, 1.00, 1.80, (0.04, 0.80), (0.06, 0.68), (0.17, 0.81), 0.07),
    "estate": _VehicleShape(4.7, 0.90, 0.30, 0.95, 1.50, (0.04, 0.70), (0.07, 0.60), (0.18, 0.80), 0.04),
    "van": _VehicleShape(5.0, 0.95, 0.32, 1.05, 2.10, (0.02, 0.88), (0.02, 0.80), (0.16, 0.84), 0.08),
    "pickup": _VehicleShape(5.3, 0.95, 0.42, 1.10, 1.85, (0.40, 0.76), (0.44, 0.66), (0.17, 0.80), 0.06),
    "bus": _VehicleShape(10.5, 1.25, 0.35, 1.20, 3.10, (0.00, 1.00), (0.00, 1.00), (0.18, 0.85), 0.07),
    "truck": _VehicleShape(7.5, 1.20, 0.55, 1.35, 2.90, (0.76, 1.00), (0.78, 0.97), (0.15, 0.28, 0.86), 0.08),
}


def draw_vehicle(rng: np.random.Generator) -> VehicleIdentity:
    """A random vehicle identity."""
    color = _pick(rng, _freq(VEHICLE_COLORS))
    vtype = _pick(rng, {name: s.frequency for name, s in VEHICLE_TYPES.items()})
    roof = _pick(rng, {"none": 0.7, "rack": 0.14, "light_bar": 0.07, "box": 0.09})
    return VehicleIdentity(
        color=color,
        type=vtype,
        window_tint="dark" if rng.random() < 0.4 else "light",
        roof="none" if vtype in ("bus", "truck") else roof,
        two_tone=bool(rng.random() < 0.15),
        stripe=_pick(rng, _freq(VEHICLE_COLORS), exclude=color) if rng.random() < 0.2 else "none",
        stickers=int(rng.choice(4, p=[0.3, 0.35, 0.25, 0.1])),
        sticker_side="left" if rng.random() < 0.5 else "right",
        decal=_pick(rng, {"none": 0.55, "left": 0.15, "right": 0.15, "rear": 0.15}),
        decal_color=_pick(rng, _freq(VEHICLE_COLORS), exclude=color),
        rim="silver" if rng.random() < 0.6 else "black",
        cargo_color=_pick(rng, _CARGO_FREQ) if vtype == "truck" else color,
        scale=float(np.clip(rng.normal(1.0, 0.03), 0.92, 1.08)),
        shade=tuple(float(s) for s in rng.normal(0.0, 6.0, 3)),
    )


def _identity_rng(seed: int, dataset: str, pid: int) -> np.random.Generator:
    return np.random.default_rng([seed, _DATASET_CODE[dataset], _IDENTITY, pid])


@lru_cache(maxsize=1 << 16)
def person_identity(seed: int, dataset: str, pid: int) -> PersonIdentity:
    """The person with this pid (or pool ``hidden_pid``) in ``dataset`` of the world ``seed``."""
    return draw_person(_identity_rng(seed, dataset, pid))


@lru_cache(maxsize=1 << 16)
def vehicle_identity(seed: int, dataset: str, vid: int) -> VehicleIdentity:
    """The vehicle with this id in ``dataset`` of the world ``seed``."""
    return draw_vehicle(_identity_rng(seed, dataset, vid))


# ---------------------------------------------------------------------------------------------
# Cameras


@dataclass(frozen=True)
class Camera:
    """Fixed parameters of one camera (see the module docstring)."""

    key: tuple[int, int, int]  # (seed, dataset code, camera): seeds the background texture
    style: str  # "street" or "road"
    brightness: float
    gains: tuple[float, float, float]  # colour cast
    gradient: float  # relative brightness change from the top to the bottom of the crop
    gamma: float
    noise: float  # sensor noise std in grey levels
    blur: float  # Gaussian blur radius in pixels at a crop height of 128
    size: float  # subject size as a fraction of the crop
    size_jitter: float
    x_jitter: float  # std of the subject centre, as a fraction of the crop
    y_jitter: float
    view_probs: tuple[float, ...]
    occlusion: float
    elevation: float  # radians above the horizon (vehicle rendering)


@lru_cache(maxsize=4096)
def make_camera(seed: int, dataset: str, cam: int, occlusion: float = 0.15, light_variation: float = 1.0,
                blur: float = 1.0) -> Camera:
    """Camera ``cam`` of ``dataset`` (a pool video counts as a camera), drawn from the seed."""
    code = _DATASET_CODE[dataset]
    rng = np.random.default_rng([seed, code, _CAMERA, cam])
    if dataset == VEHICLE_DATASET:
        # A camera watches a road: mostly one traffic direction, its neighbour bins and the opposite lane.
        main = int(rng.integers(8))
        w = np.full(8, 0.03)
        w[[(main - 1) % 8, (main + 1) % 8]] = 0.3
        w[[(main + 3) % 8, (main + 5) % 8]] = 0.12
        w[main] = 1.0
        w[(main + 4) % 8] = rng.uniform(0.2, 0.9)
        size = rng.uniform(0.8, 0.95)
    else:
        w = rng.dirichlet([1.5, 1.5, 1.5]) + 0.08
        size = rng.uniform(0.78, 0.94)
    gains = np.exp(rng.normal(0.0, 0.09 * light_variation, 3))
    return Camera(
        key=(seed, code, cam),
        style="road" if dataset == VEHICLE_DATASET else "street",
        brightness=min(1.6, max(0.5, math.exp(rng.normal(0.0, 0.22 * light_variation)))),
        gains=tuple(float(g) for g in gains / gains.mean()),
        gradient=float(rng.uniform(-0.35, 0.35) * light_variation),
        gamma=float(np.exp(rng.normal(0.0, 0.15 * light_variation))),
        noise=float(rng.uniform(1.5, 7.0)),
        blur=float(rng.uniform(0.0, 1.3) * blur),
        size=float(size),
        size_jitter=float(rng.uniform(0.02, 0.06)),
        x_jitter=float(rng.uniform(0.01, 0.05)),
        y_jitter=float(rng.uniform(0.01, 0.03)),
        view_probs=tuple(float(p) for p in w / w.sum()),
        occlusion=min(0.9, max(0.0, occlusion * math.exp(rng.normal(0.0, 0.5)))),
        elevation=float(rng.uniform(0.15, 0.6)),
    )


def _muted(rng: np.random.Generator) -> np.ndarray:
    """A random colour pulled towards grey, as most scenery is."""
    c = rng.uniform(30, 220, 3)
    return (c.mean() + (c - c.mean()) * rng.uniform(0.15, 0.6)).astype(np.float32)


def _street(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    img = np.empty((h, w, 3), np.float32)
    horizon = int(h * rng.uniform(0.45, 0.75))
    wall = _muted(rng)
    img[:horizon] = wall
    img[horizon:] = _muted(rng)
    for _ in range(int(rng.integers(3, 10))):  # windows, doors, shop fronts, signs
        rh, rw = int(rng.integers(h // 10, h // 2)), int(rng.integers(w // 8, w // 2))
        y, x = int(rng.integers(0, max(1, horizon - rh // 2))), int(rng.integers(-rw // 2, w))
        colour = _muted(rng) if rng.random() < 0.5 else wall * rng.uniform(0.55, 1.35)
        img[y:min(y + rh, horizon), max(x, 0):x + rw] = colour
    rows, cols = np.arange(h)[:, None], np.arange(w)[None, :]
    period = int(rng.integers(6, 16))
    slant = rng.uniform(-0.8, 0.8)
    joints = ((rows - horizon) % period == 0) | ((cols + (rows * slant).astype(int)) % (2 * period) == 0)
    img[joints & (rows >= horizon)] *= 0.78
    return img


def _road(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    img = np.empty((h, w, 3), np.float32)
    img[:] = rng.uniform(60, 125) * (1 + rng.normal(0, 0.04, 3))
    verge = int(h * rng.uniform(0.05, 0.3)) if rng.random() < 0.6 else 0
    img[:verge] = _muted(rng)
    rows, cols = np.arange(h)[:, None], np.arange(w)[None, :]
    angle = rng.uniform(-1.2, 1.2)
    across = cols * math.cos(angle) + rows * math.sin(angle)
    period = rng.uniform(0.35, 0.6) * w
    lines = np.abs(across % period - period / 2) < rng.uniform(0.6, 1.4)
    if rng.random() < 0.5:  # dashed lane marks
        along = rows * math.cos(angle) - cols * math.sin(angle)
        lines &= along % 24 < 13
    img[lines & (rows >= verge)] = (235, 235, 230) if rng.random() < 0.7 else (225, 190, 60)
    img *= 1 + rng.normal(0, 0.05, (h, w, 1)).astype(np.float32)  # asphalt grain
    return img


@lru_cache(maxsize=256)
def _background(cam: Camera, height: int, width: int) -> np.ndarray:
    """The camera's scene, larger than the crop so that images can pan over it (read-only, float32)."""
    rng = np.random.default_rng([*cam.key, 1])
    h, w = height + height // 4, width + width // 4
    img = _street(rng, h, w) if cam.style == "street" else _road(rng, h, w)
    coarse = Image.fromarray(rng.uniform(0.8, 1.2, (3, 4)).astype(np.float32), mode="F")
    img *= np.asarray(coarse.resize((w, h), Image.BILINEAR))[:, :, None]  # uneven lighting of the scene
    img.setflags(write=False)
    return img


@lru_cache(maxsize=64)
def _gamma_lut(gamma: float) -> np.ndarray:
    return np.round(255.0 * (np.arange(256) / 255.0) ** gamma).astype(np.uint8)


# ---------------------------------------------------------------------------------------------
# The shared image pipeline: background -> subject -> occluder -> light -> noise -> gamma -> blur

Painter = Callable[[np.ndarray, float, float, float], None]  # (canvas, centre x, centre y, size)


def _develop(canvas: np.ndarray, cam: Camera, rng: np.random.Generator) -> np.ndarray:
    """Apply the camera's light, colour cast, noise, gamma and blur to a float canvas."""
    h = canvas.shape[0]
    gains = np.asarray(cam.gains, np.float32) * np.float32(cam.brightness * math.exp(0.08 * rng.standard_normal()))
    gains *= np.exp(0.03 * rng.standard_normal(3)).astype(np.float32)  # per-image white balance drift
    ramp = 1 + np.float32(cam.gradient) * np.linspace(-0.5, 0.5, h, dtype=np.float32)
    canvas *= ramp[:, None, None] * gains
    canvas += np.float32(cam.noise) * rng.standard_normal(canvas.shape, dtype=np.float32)
    np.clip(canvas, 0, 255, out=canvas)
    img = Image.fromarray(_gamma_lut(cam.gamma)[canvas.astype(np.uint8)])
    radius = cam.blur * h / 128 * math.exp(0.25 * rng.standard_normal())
    if radius > 0.3:
        img = img.filter(ImageFilter.GaussianBlur(radius))
    return np.asarray(img)


def _occlude(canvas: np.ndarray, kind: str, rng: np.random.Generator) -> None:
    h, w = canvas.shape[:2]
    if kind == "pole":
        pw = max(2, int(w * rng.uniform(0.05, 0.12)))
        x = int(rng.integers(0, w - pw + 1))
        shading = np.linspace(0.75, 1.2, pw, dtype=np.float32)[None, :, None]  # a lit cylinder
        canvas[:, x:x + pw] = rng.uniform(40, 170) * (1 + rng.normal(0, 0.06, 3)).astype(np.float32) * shading
    elif kind == "object":  # bin, bench, parked car, barrier
        oh, ow = int(h * rng.uniform(0.2, 0.45)), int(w * rng.uniform(0.4, 1.0))
        x = int(rng.integers(-ow // 3, w - ow // 2))
        canvas[h - oh:, max(x, 0):x + ow] = _muted(rng)
        canvas[h - oh:h - oh + max(1, h // 64), max(x, 0):x + ow] *= 1.3


def _photograph(cam: Camera, rng: np.random.Generator, height: int, width: int, paint: Painter,
                passerby: Callable[[], Painter], occlusion: str, crop_shift: tuple[float, float]) -> np.ndarray:
    """Render one image of a subject through a camera; ``crop_shift`` (fractions of the crop) moves
    the subject when ``occlusion`` is "crop"."""
    bg = _background(cam, height, width)
    oy = int(rng.integers(0, bg.shape[0] - height + 1))
    ox = int(rng.integers(0, bg.shape[1] - width + 1))
    canvas = bg[oy:oy + height, ox:ox + width].copy()
    size = cam.size * math.exp(cam.size_jitter * rng.standard_normal())
    cx = width * (0.5 + cam.x_jitter * rng.standard_normal())
    cy = height * (0.5 + cam.y_jitter * rng.standard_normal())
    if occlusion == "crop":
        cx += crop_shift[0] * width
        cy += crop_shift[1] * height
    paint(canvas, cx, cy, size)
    if occlusion == "passerby":
        side = 1 if rng.random() < 0.5 else -1
        passerby()(canvas, cx + side * width * rng.uniform(0.4, 0.7), cy + height * rng.uniform(0.0, 0.08),
                   size * rng.uniform(0.9, 1.1))
    else:
        _occlude(canvas, occlusion, rng)
    return _develop(canvas, cam, rng)


def encode_jpeg(img: np.ndarray, quality: int = 90) -> bytes:
    """JPEG bytes of an HxWx3 uint8 image (deterministic for a given libjpeg)."""
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


# ---------------------------------------------------------------------------------------------
# Persons. Body coordinates: v = 0 at the top of the head to 1 at the soles, u across, both in
# body heights; ``ub`` divides u by the build so that clothes follow the body width.


def _band(v: np.ndarray, v0: float, v1: float) -> np.ndarray:
    return (v >= v0) & (v < v1)


def _paint_person(canvas: np.ndarray, p: PersonIdentity, view: int, cx: float, top: float, hp: float,
                  mirror: bool, stride: float, swing: float) -> None:
    """Paint person ``p`` seen from ``view`` (mirrored side views face left) with the head top at
    row ``top``, centred on column ``cx`` and ``hp`` pixels tall."""
    h, w = canvas.shape[:2]
    v = ((np.arange(h, dtype=np.float32) + 0.5 - top) / hp)[:, None]
    u = ((np.arange(w, dtype=np.float32) + 0.5 - cx) / hp)[None, :]
    if mirror:
        u = -u
    ub = u / p.build
    front, back, side = view == 0, view == 1, view == 2
    top_rgb = _rgb(PERSON_COLORS, p.top_color, p.shade)
    top2_rgb = _rgb(PERSON_COLORS, p.top_color2, p.shade)
    bottom_rgb = _rgb(PERSON_COLORS, p.bottom_color, p.shade)
    skin = np.asarray(SKIN_TONES[p.skin], np.float32)
    sw, hw = (0.07, 0.066) if side else (0.125, 0.1)  # shoulder and hip half widths (depth from the side)
    pside = 1 if p.handbag == "left" else -1
    # From the front the person's left is on the image right; from the side (facing +u) the camera
    # sees the right side, or the left one when mirrored.
    bag_near = p.handbag != "none" and side and (pside == 1) == mirror
    bag_far = p.handbag != "none" and side and not bag_near

    if bag_far:  # peeks out behind the hips
        canvas[_band(v, 0.43, 0.57) & (ub > -0.1) & (ub < -0.02)] = _rgb(PERSON_COLORS, p.handbag_color)
    if p.backpack != "none" and side:
        canvas[_band(v, 0.18, 0.46) & (ub < -sw + 0.005) & (ub > -sw - 0.075)] = _rgb(PERSON_COLORS, p.backpack)

    # Legs, bottom garment, shoes.
    taper = (0.046 - 0.012 * (v - 0.56) / 0.4) * (0.85 if side else 1.0)
    if side:
        c = stride * (v - 0.56) / 0.4
        legs = _band(v, 0.56, 0.955) & ((np.abs(ub - c) < taper) | (np.abs(ub + c) < taper))
    else:
        legs = _band(v, 0.56, 0.955) & (np.abs(np.abs(ub) - 0.05) < taper)
    hips = _band(v, 0.5, 0.58) & (np.abs(ub) < hw)
    if p.bottom_type == "trousers":
        canvas[legs | hips] = bottom_rgb
    else:
        canvas[legs] = skin
        if p.bottom_type == "shorts":
            canvas[(legs & (v < 0.7)) | hips] = bottom_rgb
        else:
            canvas[_band(v, 0.5, 0.75) & (np.abs(ub) < hw + (v - 0.5) * 0.4)] = bottom_rgb
    shoes = _band(v, 0.95, 1.0)
    if side:
        toe = stride * 1.1
        shoes = shoes & ((np.abs(ub - toe - 0.012) < 0.042) | (np.abs(ub + toe - 0.012) < 0.042))
    else:
        shoes = shoes & (np.abs(np.abs(ub) - 0.05) < 0.044)
    canvas[shoes] = _rgb(PERSON_COLORS, p.shoe_color, p.shade)

    # Torso and arms; the sleeves carry the top's pattern.
    half = sw + (hw - sw) * (v - 0.15) / 0.38 - 0.9 * np.maximum(0.0, 0.19 - v)
    torso = _band(v, 0.145, 0.53) & (np.abs(ub) < half)
    if side:
        arm = _band(v, 0.16, 0.5) & (np.abs(ub - swing * (v - 0.16) / 0.34) < 0.034)
        hands = _band(v, 0.5, 0.55) & (np.abs(ub - swing * 1.05) < 0.026)
    else:
        arm = _band(v, 0.16, 0.5) & (np.abs(ub) >= half - 0.004) & (np.abs(ub) < half + 0.036 + 0.03 * (v - 0.16))
        hands = _band(v, 0.5, 0.55) & (np.abs(np.abs(ub) - (hw + 0.026)) < 0.02)
    sleeve = arm if p.sleeves == "long" else arm & (v < 0.27)
    garment = torso | sleeve
    canvas[arm] = skin
    canvas[hands] = skin
    canvas[garment] = top_rgb
    period = p.detail
    stripes_h = (np.floor((v - 0.15) / period) % 2 == 1)
    stripes_v = (np.floor(ub / period) % 2 == 1)
    if p.top_pattern == "hstripes":
        canvas[garment & stripes_h] = top2_rgb
    elif p.top_pattern == "vstripes":
        canvas[garment & stripes_v] = top2_rgb
    elif p.top_pattern == "checks":
        canvas[garment & (stripes_h ^ stripes_v)] = top2_rgb
    elif p.top_pattern == "logo" and front:
        size = period * 0.9
        canvas[torso & _band(v, 0.27 - size, 0.27 + size) & (np.abs(ub) < size)] = top2_rgb
    elif p.top_pattern == "open_jacket" and front:
        canvas[torso & (np.abs(ub) < 0.035)] = top2_rgb

    # Head, face, hair, hat.
    hx = 0.012 if side else 0.0
    vc, rv, ru = 0.075, 0.07, (0.058 if side else 0.05)
    head = ((v - vc) / rv) ** 2 + ((u - hx) / ru) ** 2 < 1
    canvas[head | (_band(v, 0.13, 0.16) & (np.abs(u) < 0.024))] = skin
    hair_rgb = _rgb(HAIR_COLORS, p.hair_color)
    crown = v < vc - 0.35 * rv
    if front:
        canvas[head & _band(v, vc - 0.012, vc + 0.006) & (np.abs(np.abs(u) - 0.02) < 0.008)] = (30, 25, 25)
        hair = head & (crown | ((np.abs(u) > 0.8 * ru) & (v < vc)))
        long_hair = _band(v, vc - 0.02, 0.25) & (np.abs(u) > 0.55 * ru) & (np.abs(u) < 1.2 * ru)
        tail = np.zeros_like(hair)
    elif back:
        hair = head
        long_hair = _band(v, vc, 0.26) & (np.abs(u) < 1.15 * ru)
        tail = _band(v, vc, 0.21) & (np.abs(u) < 0.018)
    else:
        canvas[head & _band(v, vc - 0.012, vc + 0.006) & (np.abs(u - hx - 0.6 * ru) < 0.008)] = (30, 25, 25)
        hair = head & ((u - hx < -0.2 * ru) | crown)
        long_hair = _band(v, vc, 0.25) & (u - hx > -1.15 * ru) & (u - hx < -0.1 * ru)
        tail = _band(v, vc - 0.01, vc + 0.08) & (u - hx < -0.9 * ru) & (u - hx > -ru - 0.04)
    if p.hair_style != "bald":
        canvas[hair] = hair_rgb
        if p.hair_style == "long":
            canvas[long_hair] = hair_rgb
        elif p.hair_style == "ponytail":
            canvas[tail] = hair_rgb
    if p.hat != "none":
        hat_rgb = _rgb(PERSON_COLORS, p.hat)
        canvas[head & (v < vc - 0.3 * rv)] = hat_rgb
        brim = _band(v, vc - 0.36 * rv, vc - 0.2 * rv) & (
            ((u - hx >= 0) & (u - hx < ru + 0.035)) if side else (np.abs(u) < 1.1 * ru))
        canvas[brim] = hat_rgb * 0.8

    # Accessories in front of the body.
    if p.backpack != "none":
        pack_rgb = _rgb(PERSON_COLORS, p.backpack)
        if front:
            canvas[_band(v, 0.15, 0.4) & (np.abs(np.abs(ub) - 0.55 * sw) < 0.014)] = pack_rgb
        elif back:
            body = _band(v, 0.18, 0.46) & (np.abs(ub) < 0.78 * sw)
            canvas[body] = pack_rgb
            canvas[body & (v < 0.25)] = pack_rgb * 0.75  # flap
        else:
            canvas[_band(v, 0.15, 0.4) & (np.abs(ub + 0.01) < 0.012)] = pack_rgb
    if p.handbag != "none" and not bag_far:
        bag_rgb = _rgb(PERSON_COLORS, p.handbag_color)
        if side:
            canvas[_band(v, 0.43, 0.57) & (np.abs(ub + 0.01) < 0.045)] = bag_rgb
            canvas[_band(v, 0.15, 0.43) & (np.abs(ub + 0.01) < 0.008)] = bag_rgb * 0.8
        else:
            s = pside if front else -pside
            canvas[_band(v, 0.43, 0.58) & (ub * s > hw + 0.02) & (ub * s < hw + 0.1)] = bag_rgb
            canvas[_band(v, 0.15, 0.43) & (np.abs(ub * s - sw + 0.015) < 0.008)] = bag_rgb * 0.8


def _person_painter(p: PersonIdentity, view: int, rng: np.random.Generator) -> Painter:
    mirror = bool(rng.random() < 0.5)
    stride, swing = float(rng.uniform(0.0, 0.12)), float(rng.uniform(-0.12, 0.12))

    def paint(canvas: np.ndarray, cx: float, cy: float, size: float) -> None:
        hp = size * canvas.shape[0] * p.height
        _paint_person(canvas, p, view, cx, cy - hp / 2, hp, mirror, stride, swing)

    return paint


def _random_person(rng: np.random.Generator) -> Callable[[], Painter]:
    return lambda: _person_painter(draw_person(rng), int(rng.integers(3)), rng)


def render_person(identity: PersonIdentity, view: int, rng: np.random.Generator, camera: Camera | None = None,
                  height: int = 128, width: int = 64, occlusion: str = "none") -> np.ndarray:
    """An HxWx3 uint8 image of ``identity`` seen from ``view`` (see ``PERSON_VIEWS``) by ``camera``
    (default: camera 0 of the person dataset of seed 0), with an ``occlusion`` from ``OCCLUSIONS``."""
    cam = camera or make_camera(0, PERSON_DATASET, 0)
    crop = (0.0, float(rng.uniform(0.2, 0.4)))  # bad detections cut the legs
    return _photograph(cam, rng, height, width, _person_painter(identity, view, rng), _random_person(rng),
                       occlusion, crop)


def render_distractor(kind: str, rng: np.random.Generator, camera: Camera | None = None, height: int = 128,
                      width: int = 64) -> np.ndarray:
    """A pid-0 box: "background" (no person) or "partial" (a random passer-by mostly out of the box)."""
    cam = camera or make_camera(0, PERSON_DATASET, 0)
    if kind == "background":
        return _photograph(cam, rng, height, width, lambda *_: None, _random_person(rng), "none", (0.0, 0.0))
    cut = int(rng.integers(3))  # the box holds the upper body only, the legs only, or half a body
    if cut == 0:
        shift = (0.0, float(rng.uniform(0.45, 0.65)))
    elif cut == 1:
        shift = (0.0, -float(rng.uniform(0.4, 0.55)))
    else:
        shift = ((1 if rng.random() < 0.5 else -1) * float(rng.uniform(0.4, 0.6)), 0.0)
    return _photograph(cam, rng, height, width, _random_person(rng)(), _random_person(rng), "crop", shift)


# ---------------------------------------------------------------------------------------------
# Vehicles. Vehicle frame: x forward (front at +length/2), y to the vehicle's left, z up, metres.


@dataclass(frozen=True)
class _Prism:
    """A box whose front and rear faces may lean: x0/x1 at the bottom, x0t/x1t at the top."""

    role: str  # body, cabin, cargo, roofbox or lightbar
    x0: float
    x1: float
    x0t: float
    x1t: float
    z0: float
    z1: float
    hw: float


@dataclass(frozen=True)
class _Ortho:
    """Orthographic camera: image column = ox + scale * P.right, row = oy - scale * P.up."""

    right: np.ndarray
    up: np.ndarray
    toward: np.ndarray  # unit vector from the vehicle to the camera
    scale: float
    ox: float
    oy: float


def _ortho(azimuth: float, elevation: float) -> _Ortho:
    toward = np.array([math.cos(azimuth) * math.cos(elevation), math.sin(azimuth) * math.cos(elevation),
                       math.sin(elevation)])
    right = np.array([-math.sin(azimuth), math.cos(azimuth), 0.0])
    return _Ortho(right, np.cross(toward, right), toward, 1.0, 0.0, 0.0)


def _plane(view: _Ortho, shape: tuple[int, ...], origin: tuple[float, ...], ea: tuple[float, ...],
           eb: tuple[float, ...], a_range: tuple[float, float], b_range: tuple[float, float]
           ) -> tuple[tuple[slice, slice], np.ndarray, np.ndarray] | None:
    """Plane coordinates (a, b) of ``origin + a*ea + b*eb`` for the pixels around its projected patch
    ``a_range`` x ``b_range``: (row/column slices, a, b), or None when the patch is edge-on or off-image."""
    o, ea_, eb_ = np.asarray(origin, float), np.asarray(ea, float), np.asarray(eb, float)
    pc = view.ox + view.scale * (o @ view.right)
    pr = view.oy - view.scale * (o @ view.up)
    ca, ra = view.scale * (ea_ @ view.right), -view.scale * (ea_ @ view.up)
    cb, rb = view.scale * (eb_ @ view.right), -view.scale * (eb_ @ view.up)
    det = ca * rb - cb * ra
    if abs(det) < 1e-6:
        return None
    corners_c = [pc + a * ca + b * cb for a in a_range for b in b_range]
    corners_r = [pr + a * ra + b * rb for a in a_range for b in b_range]
    c0, c1 = max(0, int(min(corners_c))), min(shape[1], int(math.ceil(max(corners_c))) + 1)
    r0, r1 = max(0, int(min(corners_r))), min(shape[0], int(math.ceil(max(corners_r))) + 1)
    if c0 >= c1 or r0 >= r1:
        return None
    dc = (np.arange(c0, c1, dtype=np.float32) + np.float32(0.5 - pc))[None, :]
    dr = (np.arange(r0, r1, dtype=np.float32) + np.float32(0.5 - pr))[:, None]
    a = (np.float32(rb / det) * dc - np.float32(cb / det) * dr)
    b = (np.float32(-ra / det) * dc + np.float32(ca / det) * dr)
    return (slice(r0, r1), slice(c0, c1)), a, b


_SUN = np.array([0.35, 0.3, 0.89]) / np.linalg.norm([0.35, 0.3, 0.89])


def _faces(p: _Prism) -> Iterator[tuple[str, tuple, tuple, tuple, np.ndarray, tuple, tuple]]:
    """(name, origin, axis a, axis b, outward normal, a range, b range) of the faces an elevated
    camera can see. Sides use (x, z), the top (x, y), the leaning ends (y, t) with z = z0 + t*(z1-z0)."""
    dz = p.z1 - p.z0
    xs = (min(p.x0, p.x0t), max(p.x1, p.x1t))
    yield "left", (0, p.hw, 0), (1, 0, 0), (0, 0, 1), np.array([0, 1.0, 0]), xs, (p.z0, p.z1)
    yield "right", (0, -p.hw, 0), (1, 0, 0), (0, 0, 1), np.array([0, -1.0, 0]), xs, (p.z0, p.z1)
    n = np.array([dz, 0, p.x1 - p.x1t])
    yield "front", (p.x1, 0, p.z0), (0, 1, 0), (p.x1t - p.x1, 0, dz), n / np.linalg.norm(n), (-p.hw, p.hw), (0, 1)
    n = np.array([-dz, 0, p.x0t - p.x0])
    yield "rear", (p.x0, 0, p.z0), (0, 1, 0), (p.x0t - p.x0, 0, dz), n / np.linalg.norm(n), (-p.hw, p.hw), (0, 1)
    yield "top", (0, 0, p.z1), (1, 0, 0), (0, 1, 0), np.array([0, 0, 1.0]), (p.x0t, p.x1t), (-p.hw, p.hw)


def _vehicle_pieces(veh: VehicleIdentity) -> tuple[_VehicleShape, float, list[_Prism]]:
    s = VEHICLE_TYPES[veh.type]
    length = s.length * veh.scale

    def x(f: float) -> float:  # fraction of the length from the rear -> metres
        return (f - 0.5) * length

    pieces = [_Prism("body", x(0), x(1), x(0) + 0.05, x(1) - 0.1, s.clearance, s.belt, s.half_width),
              _Prism("cabin", x(s.cabin_bottom[0]), x(s.cabin_bottom[1]), x(s.cabin_top[0]), x(s.cabin_top[1]),
                     s.belt, s.roof, s.half_width - 0.06)]
    if veh.type == "truck":
        pieces.append(_Prism("cargo", x(0), x(0.73), x(0), x(0.73), s.belt - 0.1, s.roof + 0.35, s.half_width + 0.02))
    top0, top1 = x(s.cabin_top[0]), x(s.cabin_top[1])
    if veh.roof == "light_bar":
        pieces.append(_Prism("lightbar", top1 - 0.55, top1 - 0.3, top1 - 0.55, top1 - 0.3, s.roof, s.roof + 0.16, 0.5))
    elif veh.roof == "box":
        mid = (top0 + top1) / 2
        pieces.append(_Prism("roofbox", mid - 0.8, mid + 0.8, mid - 0.7, mid + 0.75, s.roof, s.roof + 0.32, 0.45))
    return s, length, pieces


def _paint_vehicle_face(sub: np.ndarray, inside: np.ndarray, a: np.ndarray, b: np.ndarray, face: str,
                        p: _Prism, veh: VehicleIdentity, shape: _VehicleShape, lit: float) -> None:
    """Base colour and details of one visible face (coordinates as described in ``_faces``)."""
    body = _rgb(VEHICLE_COLORS, veh.color, veh.shade) * lit
    z = p.z0 + b * (p.z1 - p.z0) if face in ("front", "rear") else b
    if p.role == "roofbox":
        sub[inside] = np.float32(45 * lit)
        return
    if p.role == "lightbar":
        sub[inside] = np.asarray((235, 205, 70), np.float32) * lit
        return
    if p.role == "cargo":
        sub[inside] = _rgb(VEHICLE_COLORS, veh.cargo_color, veh.shade) * lit
        if face == "rear":
            sub[inside & (np.abs(a) < 0.03)] = np.float32(60 * lit)  # door seam
        return
    if p.role == "cabin":
        sub[inside] = body * 0.3 if veh.two_tone and face == "top" else body
        glass = _GLASS_RGB[veh.window_tint] * (0.7 + 0.6 * lit)
        if face in ("left", "right"):
            t = (z - p.z0) / (p.z1 - p.z0)
            lo, hi = p.x0 + (p.x0t - p.x0) * t + 0.1, p.x1 + (p.x1t - p.x1) * t - 0.1
            pane = inside & (z > p.z0 + 0.07) & (z < p.z1 - 0.08) & (a > lo) & (a < hi)
            pillars = (a - p.x0) % 1.2 < 0.15 if veh.type == "bus" else np.abs(a - (p.x0 + p.x1) / 2 + 0.1) < 0.07
            sub[pane & ~pillars] = glass
        elif face in ("front", "rear"):
            sub[inside & (np.abs(a) < p.hw - 0.09) & (b > 0.1) & (b < 0.9)] = glass
            if face == "front" and veh.stickers:
                corner = 1 if veh.sticker_side == "left" else -1
                for k in range(veh.stickers):  # square inspection stickers along the top edge
                    ys = corner * (p.hw - 0.22 - 0.17 * k)
                    sub[inside & (np.abs(a - ys) < 0.065) & (b > 0.7) & (b < 0.84)] = _STICKER_RGB[k] * lit
        elif veh.roof == "rack":
            rails = (np.abs(np.abs(b) - (p.hw - 0.12)) < 0.05) | ((a - p.x0t) % 0.7 < 0.06)
            sub[inside & rails & (np.abs(b) < p.hw - 0.07)] = np.float32(50 * lit)
        return
    # The lower body.
    sub[inside] = body
    if face in ("left", "right"):
        sub[inside & (z < p.z0 + 0.12)] = body * 0.5  # sill
        if veh.stripe != "none":
            sub[inside & (np.abs(z - p.z1 + 0.2) < 0.055)] = _rgb(VEHICLE_COLORS, veh.stripe) * lit
        sub[inside & (np.abs(a - (p.x0 + p.x1) / 2 - 0.15) < 0.02) & (z > p.z0 + 0.12)] = body * 0.55  # door seam
        if veh.decal == face:
            xd = p.x0 + 0.6 * (p.x1 - p.x0)
            zd = (p.z0 + p.z1) / 2
            oval = ((a - xd) / 0.4) ** 2 + ((z - zd) / 0.17) ** 2 < 1
            sub[inside & oval] = _rgb(VEHICLE_COLORS, veh.decal_color) * lit
    elif face in ("front", "rear"):
        sub[inside & (z < p.z0 + 0.16)] = np.float32(40 * lit)  # bumper
        corner = inside & (np.abs(a) > p.hw - 0.38) & (np.abs(a) < p.hw - 0.06) & (z > p.z1 - 0.3) & (z < p.z1 - 0.1)
        plate = (30, 60, 170) if veh.type not in ("bus", "truck") else (220, 180, 40)
        sub[inside & (np.abs(a) < 0.23) & (z > p.z0 + 0.19) & (z < p.z0 + 0.33)] = np.asarray(plate, np.float32) * lit
        if face == "front":
            grille = (np.abs(a) < 0.45 * p.hw) & (z > p.z1 - 0.34) & (z < p.z1 - 0.1)
            sub[inside & grille] = np.float32(30 * lit)
            sub[corner] = np.asarray((240, 240, 215), np.float32) * (0.7 + 0.3 * lit)
        else:
            sub[corner] = np.asarray((195, 25, 25), np.float32) * lit
            if veh.decal == "rear":
                sub[inside & (a > -0.6 * p.hw) & (a < -0.15 * p.hw) & (z > p.z1 - 0.3) & (z < p.z1 - 0.12)] = \
                    _rgb(VEHICLE_COLORS, veh.decal_color) * lit
    elif veh.type == "pickup":
        bed = inside & (a < p.x0 + (p.x1 - p.x0) * shape.cabin_bottom[0] - 0.1) & (a > p.x0t + 0.12)
        sub[bed & (np.abs(b) < p.hw - 0.12)] = body * 0.3


def _paint_vehicle(canvas: np.ndarray, veh: VehicleIdentity, azimuth: float, elevation: float, cx: float,
                   cy: float, size: float) -> None:
    """Paint ``veh`` seen from ``azimuth`` (radians, 0 = from the front, positive towards the vehicle's
    left) and ``elevation``, its projected bounding box ``size`` times the crop, centred at (cx, cy)."""
    shape, length, pieces = _vehicle_pieces(veh)
    view = _ortho(azimuth, elevation)
    corners = np.array([(x, y, z) for p in pieces for x, z in ((p.x0, p.z0), (p.x1, p.z0), (p.x0t, p.z1),
                                                               (p.x1t, p.z1)) for y in (-p.hw, p.hw)]
                       + [(sx * length / 2, sy * shape.half_width, 0) for sx in (-1, 1) for sy in (-1, 1)])
    cols, rows = corners @ view.right, -(corners @ view.up)
    h, w = canvas.shape[:2]
    scale = size * min(w / np.ptp(cols), h / np.ptp(rows))
    view = _Ortho(view.right, view.up, view.toward, scale, cx - scale * (cols.min() + cols.max()) / 2,
                  cy - scale * (rows.min() + rows.max()) / 2)
    # Shadow on the road.
    ground = _plane(view, canvas.shape, (0, 0, 0), (1, 0, 0), (0, 1, 0), (-length / 2 - 0.2, length / 2 + 0.2),
                    (-shape.half_width - 0.2, shape.half_width + 0.2))
    if ground is not None:
        sl, a, b = ground
        canvas[sl][(np.abs(a) < length / 2 + 0.2) & (np.abs(b) < shape.half_width + 0.2)] *= 0.45
    body, upper = pieces[0], pieces[1:]
    # Stacked pieces are drawn bottom first; the truck's cab and cargo box are side by side, farthest first.
    upper.sort(key=lambda p: (p.role in ("lightbar", "roofbox"), ((p.x0 + p.x1) / 2) * view.toward[0]))
    for i, p in enumerate([body, *upper]):
        for face, origin, ea, eb, normal, a_range, b_range in _faces(p):
            if normal @ view.toward < 0.03:
                continue
            region = _plane(view, canvas.shape, origin, ea, eb, a_range, b_range)
            if region is None:
                continue
            sl, a, b = region
            if face in ("left", "right"):
                t = (b - p.z0) / (p.z1 - p.z0)
                inside = (t >= 0) & (t <= 1) & (a >= p.x0 + (p.x0t - p.x0) * t) & (a <= p.x1 + (p.x1t - p.x1) * t)
            else:
                inside = (a >= a_range[0]) & (a <= a_range[1]) & (b >= b_range[0]) & (b <= b_range[1])
            lit = 0.62 + 0.45 * max(0.0, float(normal @ _SUN))
            _paint_vehicle_face(canvas[sl], inside, a, b, face, p, veh, shape, lit)
        if i == 0:
            _paint_wheels(canvas, view, veh, shape, length)


def _paint_wheels(canvas: np.ndarray, view: _Ortho, veh: VehicleIdentity, shape: _VehicleShape,
                  length: float) -> None:
    hw = shape.half_width
    r = 0.5 if veh.type in ("bus", "truck") else 0.33
    rim = np.float32(175 if veh.rim == "silver" else 45)
    for sign in (1, -1):  # side faces: round tyres with rims
        if sign * view.toward[1] < 0.03:
            continue
        for f in shape.wheels:
            xw = (f - 0.5) * length
            region = _plane(view, canvas.shape, (0, sign * hw, 0), (1, 0, 0), (0, 0, 1), (xw - r, xw + r), (0, 2 * r))
            if region is None:
                continue
            sl, a, b = region
            d2 = (a - xw) ** 2 + (b - r) ** 2
            sub = canvas[sl]
            sub[d2 < r * r] = 22
            sub[d2 < (0.55 * r) ** 2] = rim
    for sign in (1, -1):  # ends: the tyres under the bumper
        if sign * view.toward[0] < 0.03:
            continue
        region = _plane(view, canvas.shape, (sign * length / 2, 0, 0), (0, 1, 0), (0, 0, 1), (-hw, hw),
                        (0, shape.clearance + 0.05))
        if region is not None:
            sl, a, b = region
            canvas[sl][(np.abs(a) > hw - 0.3) & (np.abs(a) < hw - 0.04) & (b >= 0) & (b < shape.clearance + 0.05)] = 22


def _vehicle_painter(veh: VehicleIdentity, view: int, elevation: float, rng: np.random.Generator) -> Painter:
    azimuth = -view * math.pi / 4 + 0.09 * rng.standard_normal()
    elev = max(0.05, elevation + 0.04 * rng.standard_normal())
    return lambda canvas, cx, cy, size: _paint_vehicle(canvas, veh, azimuth, elev, cx, cy, size)


def render_vehicle(identity: VehicleIdentity, view: int, rng: np.random.Generator, camera: Camera | None = None,
                   height: int = 128, width: int = 128, occlusion: str = "none") -> np.ndarray:
    """An HxWx3 uint8 image of ``identity`` in orientation bin ``view`` (see ``VEHICLE_VIEWS``) seen by
    ``camera`` (default: camera 0 of the vehicle dataset of seed 0), with an ``occlusion`` from ``OCCLUSIONS``."""
    cam = camera or make_camera(0, VEHICLE_DATASET, 0)
    crop = (float(rng.choice([-1, 1]) * rng.uniform(0.25, 0.4)), 0.0)  # boxes that cut the front or back off

    def passerby() -> Painter:
        return _vehicle_painter(draw_vehicle(rng), int(rng.integers(8)), cam.elevation, rng)

    return _photograph(cam, rng, height, width, _vehicle_painter(identity, view, cam.elevation, rng), passerby,
                       occlusion, crop)


# ---------------------------------------------------------------------------------------------
# Split plans and sources


def _sample_views(rng: np.random.Generator, cams: list[Camera], camid: np.ndarray) -> np.ndarray:
    cum = np.cumsum(np.array([c.view_probs for c in cams]), axis=1)
    return np.minimum((rng.random(len(camid))[:, None] > cum[camid]).sum(1), cum.shape[1] - 1)


def _sample_occlusions(rng: np.random.Generator, cams: list[Camera], camid: np.ndarray) -> np.ndarray:
    occluded = rng.random(len(camid)) < np.array([c.occlusion for c in cams])[camid]
    kinds = rng.choice(len(_OCCLUSION_MIX), size=len(camid), p=_OCCLUSION_MIX) + 1
    return np.where(occluded, kinds, 0)


def _plan_labeled(rng: np.random.Generator, n_train: int, n_test: int, mean_train: int, mean_test: int,
                  n_cams: int) -> dict[str, dict[str, np.ndarray]]:
    """Raw ids and cameras of the train, query and gallery images of a Market/VeRi-style dataset."""
    ids = rng.permutation(n_train + n_test) + 1
    rows: dict[str, list[tuple[int, int]]] = {"train": [], "query": [], "gallery": []}
    for split_ids, mean, per_cam in ((np.sort(ids[:n_train]), mean_train, 1), (np.sort(ids[n_train:]), mean_test, 2)):
        for pid in split_ids:
            n = max(2 * per_cam, int(round(mean * rng.lognormal(0.0, 0.3))))
            k = int(rng.integers(2, max(2, min(n_cams, n // per_cam)) + 1))
            cams = np.sort(rng.choice(n_cams, k, replace=False))
            counts = per_cam + rng.multinomial(max(0, n - per_cam * k), np.full(k, 1 / k))
            if per_cam == 1:
                rows["train"] += [(int(pid), int(c)) for c in np.repeat(cams, counts)]
                continue
            queried = rng.random(k) < _QUERY_CAMERA_PROB
            queried[rng.integers(k)] = True
            for c, cnt, q in zip(cams, counts, queried):
                rows["query"] += [(int(pid), int(c))] * int(q)
                rows["gallery"] += [(int(pid), int(c))] * int(cnt - q)
    return {split: {"pid": np.array([r[0] for r in rs], np.int64).reshape(-1),
                    "camid": np.array([r[1] for r in rs], np.int64).reshape(-1)} for split, rs in rows.items()}


def _frames(rng: np.random.Generator, splits: list[dict[str, np.ndarray]]) -> None:
    """Give every image of a dataset a distinct frame number, increasing in plan order."""
    start = 0
    for plan in splits:
        n = len(plan["pid"])
        plan["frame"] = 10 * (start + np.arange(n)) + rng.integers(0, 10, n)
        start += n


def _camera(cfg: SyntheticConfig, dataset: str, cam: int) -> Camera:
    return make_camera(cfg.seed, dataset, cam, cfg.occlusion, cfg.light_variation, cfg.blur)


def _check_index(i: int, n: int) -> int:
    i = operator.index(i)
    if not 0 <= i < n:
        raise IndexError(f"index {i} out of range for a source of {n} records")
    return i


class _SyntheticSource(ABC):
    """Shared by all splits: the per-index plan, the per-image random stream and JPEG encoding."""

    dataset: str

    def __init__(self, cfg: SyntheticConfig, split: str, plan: dict[str, np.ndarray]) -> None:
        self.cfg = cfg
        self.split = split
        self.plan = plan
        self._n = len(next(iter(plan.values())))

    def __len__(self) -> int:
        return self._n

    def __repr__(self) -> str:
        return f"{type(self).__name__}(dataset={self.dataset!r}, split={self.split!r}, len={self._n})"

    @property
    def fingerprint(self) -> str:
        """What the images depend on beyond their meta: the renderer and every config knob."""
        return f"{self.dataset}/{self.split} render v{RENDER_VERSION} {self.cfg!r}"

    def _rng(self, i: int) -> np.random.Generator:
        return np.random.default_rng([self.cfg.seed, _DATASET_CODE[self.dataset], _IMAGE, _SPLIT_CODE[self.split], i])

    def camera(self, cam: int) -> Camera:
        """The fixed parameters of camera (or pool video) ``cam``."""
        return _camera(self.cfg, self.dataset, int(cam))

    @abstractmethod
    def key(self, i: int) -> str: ...

    @abstractmethod
    def meta(self, i: int) -> dict[str, Any]: ...

    @abstractmethod
    def render(self, i: int) -> np.ndarray:
        """Image ``i`` as an HxWx3 uint8 array."""

    def image(self, i: int) -> tuple[bytes, str]:
        return encode_jpeg(self.render(i), self.cfg.jpeg_quality), "jpg"


class SyntheticPersonSource(_SyntheticSource):
    """One split of ``synthetic_person`` (Market-1501 protocol)."""

    dataset = PERSON_DATASET

    def key(self, i: int) -> str:
        i = _check_index(i, self._n)
        p = self.plan
        return f"{p['pid'][i]:04d}_c{p['camid'][i] + 1}s1_{p['frame'][i]:06d}_00"

    def meta(self, i: int) -> dict[str, Any]:
        i = _check_index(i, self._n)
        p = self.plan
        pid, view = int(p["pid"][i]), int(p["viewid"][i])
        meta = {"pid": pid, "camid": int(p["camid"][i]), "viewid": view if view >= 0 else None, "source": self.dataset,
                "occlusion": OCCLUSIONS[p["occlusion"][i]], "distractor": DISTRACTORS[p["distractor"][i]]}
        if pid > 0:
            meta.update(person_identity(self.cfg.seed, self.dataset, pid).attributes())
        else:
            meta.update(dict.fromkeys(PERSON_ATTRIBUTES))
        return meta

    def render(self, i: int) -> np.ndarray:
        i = _check_index(i, self._n)
        p, c, rng = self.plan, self.cfg, self._rng(i)
        cam = self.camera(p["camid"][i])
        if p["distractor"][i]:
            return render_distractor(DISTRACTORS[p["distractor"][i]], rng, cam, c.height, c.width)
        ident = person_identity(c.seed, self.dataset, int(p["pid"][i]))
        return render_person(ident, int(p["viewid"][i]), rng, cam, c.height, c.width, OCCLUSIONS[p["occlusion"][i]])


class SyntheticPoolSource(_SyntheticSource):
    """The unlabeled LUPerson-like pool of ``synthetic_lup``; the truth is kept in ``hidden_*`` meta.

    Keys number the country, the city within it, the video within the city and the image; meta
    ``video`` (= ``hidden_camid``) is the video's index over the whole pool.
    """

    dataset = POOL_DATASET

    def __init__(self, cfg: SyntheticConfig, plan: dict[str, np.ndarray], video_of_id: np.ndarray,
                 videos: dict[str, np.ndarray]) -> None:
        super().__init__(cfg, "pool", plan)
        # Per-identity and per-video tables, so that the per-image plan stays small for big pools.
        self.video_of_id = video_of_id.astype(np.int32)
        self.videos = {name: a.astype(np.int32) for name, a in videos.items()}

    def _video(self, i: int) -> int:
        return int(self.video_of_id[self.plan["hidden_pid"][i]])

    def key(self, i: int) -> str:
        i = _check_index(i, self._n)
        v, t = self._video(i), self.videos
        return f"{t['country'][v]:02d}_{t['city_in_country'][v]:02d}_{t['video_in_city'][v]:04d}_{i:08d}"

    def meta(self, i: int) -> dict[str, Any]:
        i = _check_index(i, self._n)
        p, v = self.plan, self._video(i)
        return {"pid": None, "camid": None, "viewid": None, "source": self.dataset,
                "hidden_pid": int(p["hidden_pid"][i]), "hidden_camid": v, "hidden_viewid": int(p["viewid"][i]),
                "video": v, "country": int(self.videos["country"][v]), "city": int(self.videos["city_in_country"][v]),
                "occlusion": OCCLUSIONS[p["occlusion"][i]]}

    def render(self, i: int) -> np.ndarray:
        i = _check_index(i, self._n)
        p, c = self.plan, self.cfg
        ident = person_identity(c.seed, self.dataset, int(p["hidden_pid"][i]))
        return render_person(ident, int(p["viewid"][i]), self._rng(i), self.camera(self._video(i)), c.height,
                             c.width, OCCLUSIONS[p["occlusion"][i]])


class SyntheticVehicleSource(_SyntheticSource):
    """One split of ``synthetic_vehicle`` (VeRi-776 protocol)."""

    dataset = VEHICLE_DATASET

    def key(self, i: int) -> str:
        i = _check_index(i, self._n)
        p = self.plan
        return f"{p['pid'][i]:04d}_c{p['camid'][i] + 1:03d}_{p['frame'][i]:08d}_0"

    def meta(self, i: int) -> dict[str, Any]:
        i = _check_index(i, self._n)
        p = self.plan
        pid = int(p["pid"][i])
        return {"pid": pid, "camid": int(p["camid"][i]), "viewid": int(p["viewid"][i]), "source": self.dataset,
                "occlusion": OCCLUSIONS[p["occlusion"][i]],
                **vehicle_identity(self.cfg.seed, self.dataset, pid).attributes()}

    def render(self, i: int) -> np.ndarray:
        i = _check_index(i, self._n)
        p, c = self.plan, self.cfg
        ident = vehicle_identity(c.seed, self.dataset, int(p["pid"][i]))
        return render_vehicle(ident, int(p["viewid"][i]), self._rng(i), self.camera(p["camid"][i]),
                              c.vehicle_height, c.vehicle_width, OCCLUSIONS[p["occlusion"][i]])


def _as_config(cfg: Any) -> SyntheticConfig:
    """Accept a SyntheticConfig or anything with its fields (e.g. an OmegaConf node)."""
    if isinstance(cfg, SyntheticConfig):
        return cfg
    return SyntheticConfig(**{f.name: getattr(cfg, f.name) for f in fields(SyntheticConfig)})


def _person_sources(cfg: SyntheticConfig) -> dict[str, SyntheticPersonSource]:
    rng = np.random.default_rng([cfg.seed, _DATASET_CODE[PERSON_DATASET], _PLAN])
    plans = _plan_labeled(rng, cfg.train_ids, cfg.test_ids, cfg.images_per_train_id, cfg.images_per_test_id,
                          cfg.cameras)
    gallery = plans["gallery"]
    n_d = cfg.distractors
    d_cam = rng.integers(0, cfg.cameras, n_d)
    d_kind = rng.integers(1, len(DISTRACTORS), n_d)
    gallery["pid"] = np.concatenate([np.zeros(n_d, np.int64), gallery["pid"]])
    gallery["camid"] = np.concatenate([d_cam, gallery["camid"]])
    cams = [_camera(cfg, PERSON_DATASET, c) for c in range(cfg.cameras)]
    for plan in plans.values():
        plan["viewid"] = _sample_views(rng, cams, plan["camid"])
        plan["occlusion"] = _sample_occlusions(rng, cams, plan["camid"])
        plan["distractor"] = np.zeros(len(plan["pid"]), np.int64)
    # Distractors have no view (there is no one, or a random passer-by); both kinds are their own occlusion.
    gallery["distractor"][:n_d] = d_kind
    gallery["viewid"][:n_d] = -1
    gallery["occlusion"][:n_d] = np.where(d_kind == DISTRACTORS.index("partial"), OCCLUSIONS.index("crop"), 0)
    _frames(rng, [plans["train"], plans["query"], gallery])
    return {split: SyntheticPersonSource(cfg, split, plan) for split, plan in plans.items()}


def _group(rng: np.random.Generator, n_items: int, mean: int) -> np.ndarray:
    """Group index of each of ``n_items`` consecutive items, in groups of random size around ``mean``."""
    sizes = np.maximum(1, rng.poisson(mean, n_items))
    return np.repeat(np.arange(n_items), sizes)[:n_items]


def _pool_source(cfg: SyntheticConfig) -> SyntheticPoolSource:
    rng = np.random.default_rng([cfg.seed, _DATASET_CODE[POOL_DATASET], _PLAN])
    n = cfg.pool_images
    # Images per identity: a long tail, as tracklets in street videos are.
    counts = np.zeros(0, np.int64)
    while counts.sum() < n:
        chunk = 64 + n // max(1, cfg.pool_images_per_id)
        more = np.maximum(1, np.round(cfg.pool_images_per_id * rng.lognormal(-0.18, 0.6, chunk))).astype(np.int64)
        counts = np.concatenate([counts, more])
    counts = counts[:np.searchsorted(np.cumsum(counts), n) + 1]
    counts[-1] -= counts.sum() - n
    n_ids = len(counts)
    # Identities -> videos -> cities -> countries. At most 100 countries keep the keys' two-digit
    # country field up to LUPerson's scale (then cities per country grow instead).
    video_of_id = _group(rng, n_ids, cfg.pool_ids_per_video)
    n_videos = int(video_of_id.max()) + 1
    city_of_video = _group(rng, n_videos, cfg.pool_videos_per_city)
    n_cities = int(city_of_video.max()) + 1
    n_countries = min(100, -(-n_cities // cfg.pool_cities_per_country))
    country_of_city = np.arange(n_cities) * n_countries // n_cities
    hidden_pid = np.repeat(np.arange(n_ids), counts)
    video = video_of_id[hidden_pid]
    cams = [_camera(cfg, POOL_DATASET, v) for v in range(n_videos)]
    plan = {"hidden_pid": hidden_pid.astype(np.int32), "viewid": _sample_views(rng, cams, video).astype(np.int8),
            "occlusion": _sample_occlusions(rng, cams, video).astype(np.int8)}
    videos = {"country": country_of_city[city_of_video],
              "city_in_country": city_of_video - np.searchsorted(country_of_city, country_of_city[city_of_video]),
              "video_in_city": np.arange(n_videos) - np.searchsorted(city_of_video, city_of_video)}
    return SyntheticPoolSource(cfg, plan, video_of_id, videos)


def _vehicle_sources(cfg: SyntheticConfig) -> dict[str, SyntheticVehicleSource]:
    rng = np.random.default_rng([cfg.seed, _DATASET_CODE[VEHICLE_DATASET], _PLAN])
    plans = _plan_labeled(rng, cfg.vehicle_train_ids, cfg.vehicle_test_ids, cfg.images_per_vehicle_id,
                          cfg.images_per_vehicle_id, cfg.vehicle_cameras)
    cams = [_camera(cfg, VEHICLE_DATASET, c) for c in range(cfg.vehicle_cameras)]
    for plan in plans.values():
        plan["viewid"] = _sample_views(rng, cams, plan["camid"])
        plan["occlusion"] = _sample_occlusions(rng, cams, plan["camid"])
    _frames(rng, list(plans.values()))
    return {split: SyntheticVehicleSource(cfg, split, plan) for split, plan in plans.items()}


def build_sources(cfg: SyntheticConfig) -> dict[str, dict[str, RecordSource]]:
    """All synthetic datasets and their splits:
    ``{"synthetic_person": {"train", "query", "gallery"}, "synthetic_lup": {"pool"},
    "synthetic_vehicle": {"train", "query", "gallery"}}``."""
    cfg = _as_config(cfg)
    if cfg.cameras < 2 or cfg.vehicle_cameras < 2:
        raise ValueError("the query/gallery protocol needs at least 2 cameras per dataset")
    if min(cfg.train_ids, cfg.test_ids, cfg.vehicle_train_ids, cfg.vehicle_test_ids, cfg.pool_images) < 1:
        raise ValueError("every split needs at least one identity (and the pool one image)")
    return {PERSON_DATASET: _person_sources(cfg), POOL_DATASET: {"pool": _pool_source(cfg)},
            VEHICLE_DATASET: _vehicle_sources(cfg)}


@register
class SyntheticAdapter(DatasetAdapter):
    name = "synthetic"
    summary = ("the procedural re-ID world: persons (Market-1501 protocol), an unlabeled LUPerson-like pool, "
               "vehicles (VeRi-776 protocol); any SyntheticConfig field can be overridden as key=value")
    config_schema = SyntheticConfig

    def sources(self) -> dict[str, dict[str, RecordSource]]:
        return build_sources(self.config)
