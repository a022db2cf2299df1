"""Phantom colour fundus photographs: procedurally drawn, multi-site test and demo data (no real patients).

Each image is drawn in three stages, each from its own child generator (so the same generator with another
grade gives the same eye with other lesions):

1. anatomy: orange-red fundus with choroidal texture and vignetting, macula and fovea temporal to the optic disc,
   disc and cup (cup size follows the cup-to-disc ratio), arteries and veins branching from the disc in arcades;
2. disease signs: diabetic retinopathy by grade (1: microaneurysms; 2: + blot haemorrhages, hard exudates;
   3: + flame haemorrhages, cotton-wool spots; 4: + new vessels at the disc and elsewhere), drusen for AMD;
3. the site's camera: illumination gradient, colour cast, brightness, blur, resolution, noise, field-of-view layout
   (notch, circle clipped at top and bottom), burned-in text; saved as JPEG at the site's quality.

Images and patients have their own generators, seeded from (seed, site, index), so a cohort is byte-identical
for a seed whatever order, or number of sites, it is drawn with.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import cv2
import numpy as np
import pandas as pd
from PIL import Image

COUNTRIES = ("United Kingdom", "India", "Brazil", "Nigeria", "China", "United States", "Egypt", "Australia")
DEVICES = ("FundusCam 300", "RetinaView Pro 2", "OcuSnap 45", "VistaFundus X2", "ClearEye NM-1", "IrisPoint 500")
ETHNICITY_MIX = {  # rough population shares, so that group sizes differ between sites as they do in practice
    "United Kingdom": (("White", 0.82), ("South Asian", 0.08), ("Black", 0.04), ("East Asian", 0.02),
                       ("Mixed or other", 0.04)),
    "India": (("South Asian", 0.97), ("East Asian", 0.01), ("Mixed or other", 0.02)),
    "Brazil": (("Mixed or other", 0.45), ("White", 0.43), ("Black", 0.10), ("East Asian", 0.02)),
    "Nigeria": (("Black", 0.98), ("Mixed or other", 0.02)),
    "China": (("East Asian", 0.98), ("Mixed or other", 0.02)),
    "United States": (("White", 0.60), ("Hispanic", 0.18), ("Black", 0.13), ("East Asian", 0.06),
                      ("Mixed or other", 0.03)),
    "Egypt": (("Middle Eastern or North African", 0.97), ("Mixed or other", 0.03)),
    "Australia": (("White", 0.76), ("East Asian", 0.10), ("South Asian", 0.05), ("Indigenous Australian", 0.03),
                  ("Mixed or other", 0.06)),
}
LABEL_COLUMNS = ("path", "patient_id", "eye", "site", "country", "sex", "age", "ethnicity", "device",
                 "dr_grade", "referable_dr", "glaucoma", "amd", "cdr")
REFERABLE_GRADE = 2  # referable diabetic retinopathy: moderate non-proliferative or worse
REFERENCE_DR_GRADES = (0.55, 0.15, 0.15, 0.08, 0.07)  # enriched for disease, so that small cohorts hold every grade

_SITE_STREAM, _PATIENT_STREAM, _IMAGE_STREAM = 0, 1, 2


def _rng(seed: int, stream: int, site_index: int, index: int) -> np.random.Generator:
    return np.random.default_rng([seed % 2**64, stream, site_index, index])  # SeedSequence wants non-negative ints


# ---- sites ------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class SiteProfile:
    """One hospital and camera: how its photographs look and who its patients are."""

    name: str
    country: str
    device: str
    colour_cast: tuple[float, float, float] = (1.0, 1.0, 1.0)  # RGB multipliers
    brightness: float = 1.0
    gradient: float = 0.0  # illumination change from FOV centre to edge, as a fraction (0.2: +-20%)
    gradient_angle: float = 0.0  # direction the illumination brightens towards, radians
    blur_sigma: float = 0.0  # Gaussian blur, pixels at 256 px (scaled with the image)
    noise_sigma: float = 1.5  # grey levels
    scale: float = 1.0  # output height = round(size * scale)
    jpeg_quality: int = 95
    layout: str = "circle"  # "circle": whole FOV on black; "clipped": wider frame, circle cut at top and bottom
    notch: bool = False  # small rectangular tab on the FOV edge, as many cameras have
    text_overlay: bool = False  # burned-in, non-identifying text ("OD 45deg") in the black border
    dr_grade_probs: tuple[float, float, float, float, float] = REFERENCE_DR_GRADES
    glaucoma_prevalence: float = 0.2
    female_share: float = 0.5
    age_mean: float = 60.0
    age_sd: float = 12.0
    ethnicity_mix: tuple[tuple[str, float], ...] = (("Mixed or other", 1.0),)


def site_profiles(sites: int, seed: int) -> list[SiteProfile]:
    """Site k's profile depends only on (k, seed): site 0 is a clean reference, site 1 under-exposed, site 2 has a
    notch, text and a clipped frame; later sites draw their style and prevalence at random."""
    return [_site_profile(k, seed) for k in range(sites)]


def _site_profile(k: int, seed: int) -> SiteProfile:
    country = COUNTRIES[k % len(COUNTRIES)]
    who = dict(name=f"site{k + 1}", country=country, device=DEVICES[k % len(DEVICES)],
               ethnicity_mix=ETHNICITY_MIX[country])
    if k == 0:
        return SiteProfile(**who)
    rng = _rng(seed, _SITE_STREAM, k, 0)
    style = dict(colour_cast=tuple(round(float(c), 3) for c in rng.uniform(0.82, 1.18, 3)),
                 brightness=round(float(rng.uniform(0.85, 1.2)), 3), gradient=round(float(rng.uniform(0.05, 0.3)), 3),
                 gradient_angle=round(float(rng.uniform(0, 2 * math.pi)), 3),
                 blur_sigma=round(float(rng.uniform(0.3, 1.5)), 2), noise_sigma=round(float(rng.uniform(1.5, 5)), 2),
                 scale=round(float(rng.uniform(0.75, 1.5)), 2), jpeg_quality=int(rng.integers(70, 96)),
                 layout="clipped" if rng.random() < 0.35 else "circle", notch=bool(rng.random() < 0.4),
                 text_overlay=bool(rng.random() < 0.4))
    grades = rng.dirichlet(np.asarray(REFERENCE_DR_GRADES) * 25)
    prevalence = dict(dr_grade_probs=tuple(round(float(p), 4) for p in grades / grades.sum()),
                      glaucoma_prevalence=round(float(rng.uniform(0.1, 0.35)), 3),
                      female_share=round(float(rng.uniform(0.4, 0.62)), 3),
                      age_mean=round(float(rng.uniform(50, 68)), 1), age_sd=round(float(rng.uniform(8, 14)), 1))
    if k == 1:
        style.update(brightness=0.5, colour_cast=(1.0, 0.92, 1.05))
    elif k == 2:
        style.update(notch=True, text_overlay=True, layout="clipped")
    return SiteProfile(**who, **style, **prevalence)


# ---- anatomy ----------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class _Eye:
    cx: float  # FOV centre and radius, pixels of the rendering canvas
    cy: float
    r: float
    side: int  # +1 right eye (disc on the viewer's right), -1 left eye
    disc: tuple[float, float]
    disc_r: float
    fovea: tuple[float, float]


def _place_eye(rng: np.random.Generator, height: int, width: int, r: float, eye: str) -> _Eye:
    cx, cy, side = (width - 1) / 2, (height - 1) / 2, 1 if eye == "R" else -1
    jitter = rng.normal(0, 0.02 * r, 4).tolist()  # Python floats keep float32 arithmetic float32
    disc = (cx + side * 0.42 * r + jitter[0], cy - 0.03 * r + jitter[1])
    fovea = (cx - side * 0.12 * r + jitter[2], cy + 0.03 * r + jitter[3])  # ~2.5 disc diameters temporal of the disc
    return _Eye(cx, cy, r, side, disc, 0.125 * r * float(rng.uniform(0.9, 1.1)), fovea)


def _box(mask: np.ndarray, pad: int) -> tuple[slice, slice] | None:
    """The bounding box of the non-zero pixels plus ``pad``: blurring and blending there is cheap at any size."""
    rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
    if rows.size == 0:
        return None
    return (slice(max(rows[0] - pad, 0), rows[-1] + pad + 1), slice(max(cols[0] - pad, 0), cols[-1] + pad + 1))


def _soften(mask: np.ndarray, sigma: float) -> np.ndarray:
    box = _box(mask, int(3 * sigma) + 2)
    if box is not None and sigma > 0.3:
        mask[box] = cv2.GaussianBlur(mask[box], (0, 0), sigma)
    return mask


def _paint(rgb: np.ndarray, mask: np.ndarray, colour: tuple[float, float, float]) -> None:
    """Blend towards ``colour`` where ``mask`` (0-1) is set: pale deposits and the disc cover what is beneath."""
    box = _box(mask, 0)
    if box is not None:
        alpha = mask[box][..., None]
        rgb[box] += alpha * (np.asarray(colour, np.float32) - rgb[box])


def _absorb(rgb: np.ndarray, mask: np.ndarray, absorbance: tuple[float, float, float]) -> None:
    """Darken by ``absorbance`` per channel where ``mask`` is set: blood absorbs green and blue more than red."""
    box = _box(mask, 0)
    if box is not None:
        rgb[box] *= 1 - mask[box][..., None] * np.asarray(absorbance, np.float32)


def _draw_fundus(rng: np.random.Generator, eye: _Eye, height: int, width: int, cdr: float) -> np.ndarray:
    """Background, macula, disc and cup, vessels; float RGB, not yet vignetted or masked to the FOV."""
    yy, xx = np.arange(height, dtype=np.float32)[:, None], np.arange(width, dtype=np.float32)[None, :]
    pigment = rng.uniform(0, 1)  # fundi range from light orange to dark red-brown
    colour = np.array([215 - 35 * pigment, 100 - 35 * pigment, 45 - 20 * pigment], np.float32)
    texture = 0.045 * _smooth_noise(rng, 10, 10, height, width) + 0.03 * _smooth_noise(rng, height // 6, width // 6,
                                                                                       height, width)
    to_fovea = ((xx - eye.fovea[0]) ** 2 + (yy - eye.fovea[1]) ** 2) / eye.r ** 2
    macula, fovea = np.exp(-to_fovea / (2 * 0.16 ** 2)), np.exp(-to_fovea / (2 * 0.035 ** 2))
    shade = np.float32(1) + texture
    rgb = np.empty((height, width, 3), np.float32)
    for channel, darkening in enumerate((0.22, 0.45, 0.45)):  # macular pigment takes green and blue most
        rgb[..., channel] = colour[channel] * shade * (1 - darkening * macula - 0.25 * fovea)

    reflex = np.zeros((height, width), np.float32)  # the small bright foveal reflex
    _dot(reflex, eye.fovea, 0.008 * eye.r, 0.5)
    _paint(rgb, _soften(reflex, 0.004 * eye.r), (255, 230, 190))

    disc_mask, cup_mask = np.zeros((height, width), np.float32), np.zeros((height, width), np.float32)
    axes = (eye.disc_r * 0.95, eye.disc_r * 1.08)  # discs are slightly taller than wide
    _oval(disc_mask, eye.disc, axes)
    _paint(rgb, _soften(disc_mask, 0.05 * eye.disc_r), (248, 180, 110))
    cup_centre = (eye.disc[0] - eye.side * 0.08 * eye.disc_r, eye.disc[1])  # cups sit a little temporal
    _oval(cup_mask, cup_centre, (cdr * axes[0] * 0.95, cdr * axes[1]))
    _paint(rgb, _soften(cup_mask, 0.08 * eye.disc_r), (255, 242, 205))

    veins, arteries = np.zeros((height, width), np.float32), np.zeros((height, width), np.float32)
    for mask, artery in ((veins, False), (arteries, True)):
        for points, widths in _vessel_tree(rng, eye, artery):
            _draw_vessel(mask, points, widths, eye.r)
    _absorb(rgb, veins, (0.5, 0.8, 0.75))
    _absorb(rgb, arteries, (0.3, 0.6, 0.55))  # arteries: lighter red than veins
    return rgb


def _smooth_noise(rng: np.random.Generator, rows: int, cols: int, height: int, width: int) -> np.ndarray:
    coarse = rng.standard_normal((max(rows, 2), max(cols, 2))).astype(np.float32)
    return cv2.resize(coarse, (width, height), interpolation=cv2.INTER_CUBIC)


def _px(point: tuple[float, float]) -> tuple[int, int]:
    """cv2 drawing coordinates with 4 bits of sub-pixel precision (pass shift=4)."""
    return round(point[0] * 16), round(point[1] * 16)


def _dot(mask: np.ndarray, centre: tuple[float, float], radius: float, value: float = 1.0) -> None:
    cv2.circle(mask, _px(centre), max(round(radius * 16), 16), value, -1, cv2.LINE_AA, 4)


def _oval(mask: np.ndarray, centre: tuple[float, float], axes: tuple[float, float], angle: float = 0.0,
          value: float = 1.0) -> None:
    cv2.ellipse(mask, _px(centre), _px(axes), angle, 0, 360, value, -1, cv2.LINE_AA, 4)


def _walk(rng: np.random.Generator, eye: _Eye, start: np.ndarray, heading: float, width: float, length: float,
          curvature: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A vessel path: steps of 2% of the FOV radius, turning by ``curvature`` (per pixel, fading with distance so
    arcs straighten out) plus a little wander; tapering; it stops at the FOV edge and at the foveal avascular zone."""
    step = 0.02 * eye.r
    steps = max(int(length / step), 2)
    bend = curvature * step * np.exp(-np.arange(steps) * step / (0.9 * eye.r)) + rng.normal(0, 0.035, steps)
    headings = heading + np.cumsum(bend)
    points = start + np.cumsum(step * np.stack([np.cos(headings), np.sin(headings)], 1), axis=0)
    widths = width * np.linspace(1.0, 0.5, steps)
    stop = (np.hypot(points[:, 0] - eye.cx, points[:, 1] - eye.cy) > 1.02 * eye.r) | \
           (np.hypot(points[:, 0] - eye.fovea[0], points[:, 1] - eye.fovea[1]) < 0.07 * eye.r)
    end = int(np.argmax(stop)) if stop.any() else steps
    return np.vstack([start, points[:end]]), np.concatenate([[width], widths[:end]]), headings[:end]


def _vessel_tree(rng: np.random.Generator, eye: _Eye, artery: bool) -> list[tuple[np.ndarray, np.ndarray]]:
    """Main vessels from the disc (temporal arcades, nasal branches, small macular ones) and their branches.
    Directions are written for a right eye (temporal = towards -x) and mirrored for a left one."""
    r, calibre = eye.r, 0.017 if artery else 0.024
    offset = -0.15 if artery else 0.0  # arteries and veins leave the disc at slightly different angles
    mains = []  # (heading, curvature per radius, width per radius, length per radius)
    for vertical in (-1, 1):  # superior, inferior
        # headings in image coordinates (y down): the arcades bend temporally round the macula, nasal ones nasally
        mains.append((vertical * (math.pi / 2 + 0.05 - offset), vertical / 0.43, calibre, 1.3))
        mains.append((vertical * (math.pi / 2 - 0.6 + offset), -vertical / 1.2, 0.7 * calibre, 0.9))
    mains += [(rng.normal(0, 0.3), 0.0, 0.45 * calibre, 0.6), (math.pi + rng.normal(0, 0.3), 0.0, 0.3 * calibre, 0.35)]
    paths: list[tuple[np.ndarray, np.ndarray]] = []
    for heading, curvature, width, length in mains:
        heading, curvature = heading + rng.normal(0, 0.08), curvature * rng.uniform(0.8, 1.2)
        if eye.side < 0:
            heading, curvature = math.pi - heading, -curvature
        start = np.array(eye.disc) + 0.25 * eye.disc_r * np.array([math.cos(heading), math.sin(heading)])
        _grow(rng, eye, start, heading, width * r, length * r, curvature / r, 2, paths)
    return paths


def _grow(rng: np.random.Generator, eye: _Eye, start: np.ndarray, heading: float, width: float, length: float,
          curvature: float, depth: int, paths: list) -> None:
    points, widths, headings = _walk(rng, eye, start, heading, width, length, curvature)
    paths.append((points, widths))
    if depth == 0 or len(headings) < 6:
        return
    for _ in range(rng.poisson(len(headings) / 10)):
        i = int(rng.integers(2, len(headings) - 2))
        child_width = widths[i] * rng.uniform(0.5, 0.75)
        if child_width > 0.003 * eye.r:
            _grow(rng, eye, points[i], headings[i] + rng.choice([-1, 1]) * rng.uniform(0.4, 0.9), child_width,
                  rng.uniform(0.2, 0.5) * eye.r, rng.normal(0, 0.8) / eye.r, depth - 1, paths)


def _draw_vessel(mask: np.ndarray, points: np.ndarray, widths: np.ndarray, r: float) -> None:
    """Segment i (points i-1 to i) takes widths[i]; runs of segments that look the same go in one cv2 call."""
    if len(points) < 2:  # a vessel clipped to a single point has no segment to draw
        return
    # vessels thinner than a pixel are drawn fainter; wide vessels are darker (more blood on the light path)
    weights = np.round(np.minimum(widths, 1) * (0.65 + 0.35 * np.minimum(widths / (0.02 * r), 1)) * 16) / 16
    thickness = np.maximum(np.round(widths), 1).astype(int)
    fixed = np.round(points * 16).astype(np.int32)  # 4 fractional bits, as shift=4 expects
    style = thickness * 64 + (weights * 16).astype(int)
    for run in np.split(np.arange(1, len(points)), np.flatnonzero(np.diff(style[1:])) + 1):
        cv2.polylines(mask, [fixed[run[0] - 1:run[-1] + 1]], False, float(weights[run[0]]), int(thickness[run[0]]),
                      cv2.LINE_AA, 4)


# ---- disease signs ----------------------------------------------------------------------------------------------

# per DR grade 0-4, mean counts of: microaneurysms, blot haemorrhages, flame haemorrhages, hard exudates,
# cotton-wool spots, new-vessel tufts at the disc. Grade 4 = grade 3 + new vessels, so the two differ only by those.
DR_SIGNS = {0: (0, 0, 0, 0, 0, 0), 1: (5, 0, 0, 0, 0, 0), 2: (16, 5, 0, 14, 0, 0),
            3: (24, 14, 6, 22, 4, 0), 4: (24, 14, 6, 22, 4, 3)}


def _scatter(rng: np.random.Generator, eye: _Eye, n: int, centre: tuple[float, float], spread: float) -> np.ndarray:
    """``n`` points around ``centre`` (normal, ``spread`` x FOV radius), kept well inside the FOV."""
    points = np.asarray(centre) + rng.normal(0, spread * eye.r, (n, 2))
    offset = points - (eye.cx, eye.cy)
    distance = np.hypot(offset[:, 0], offset[:, 1])[:, None] / (0.9 * eye.r)
    return np.where(distance > 1, (eye.cx, eye.cy) + offset / distance, points)


def _count(rng: np.random.Generator, mean: float) -> int:
    return max(int(rng.poisson(mean)), 1) if mean else 0  # a sign that belongs to the grade is never absent


def _draw_lesions(rng: np.random.Generator, rgb: np.ndarray, eye: _Eye, dr_grade: int, amd: bool,
                  strength: float = 1.0) -> None:
    """Draw the grade's signs (and drusen for AMD); ``strength`` scales every sign's opacity (1: full)."""
    micro, blots, flames, exudates, cotton_wool, new_vessels = DR_SIGNS[dr_grade]
    # one generator per sign, so that adding a sign (a higher grade, AMD) leaves the others where they were
    micro_rng, blot_rng, flame_rng, exudate_rng, drusen_rng, cotton_rng, growth_rng = rng.spawn(7)
    micro, blots, flames = _count(micro_rng, micro), _count(blot_rng, blots), _count(flame_rng, flames)
    exudates, cotton_wool = _count(exudate_rng, exudates), _count(cotton_rng, cotton_wool)
    r, height, width = eye.r, rgb.shape[0], rgb.shape[1]
    pole = ((eye.disc[0] + 2 * eye.fovea[0]) / 3, (eye.disc[1] + 2 * eye.fovea[1]) / 3)
    blood, pale, white, growth = (np.zeros((height, width), np.float32) for _ in range(4))

    for x, y in _scatter(micro_rng, eye, micro, pole, 0.3):
        _dot(blood, (x, y), micro_rng.uniform(0.008, 0.014) * r)
    for x, y in _scatter(blot_rng, eye, blots, pole, 0.35):
        for dx, dy in blot_rng.normal(0, 0.012 * r, (3, 2)):  # irregular: a few overlapping discs
            _dot(blood, (x + dx, y + dy), blot_rng.uniform(0.015, 0.03) * r)
    for x, y in _scatter(flame_rng, eye, flames, eye.disc, 0.25):
        along = math.degrees(math.atan2(y - eye.disc[1], x - eye.disc[0]))  # nerve fibres run radially from the disc
        _oval(blood, (x, y), (0.055 * r, 0.014 * r), along, 0.85)
    _absorb(rgb, strength * _soften(blood, 0.004 * r), (0.5, 0.85, 0.85))

    for centre in _scatter(exudate_rng, eye, (exudates + 7) // 8, eye.fovea, 0.12):  # clusters near the macula
        for x, y in _scatter(exudate_rng, eye, 8, tuple(centre), 0.04):
            _dot(pale, (x, y), exudate_rng.uniform(0.006, 0.013) * r)
    _paint(rgb, strength * _soften(pale, 0.002 * r), (250, 225, 105))

    if amd:  # drusen: soft, duller yellow spots scattered around the fovea
        drusen = np.zeros((height, width), np.float32)
        for x, y in _scatter(drusen_rng, eye, int(drusen_rng.integers(25, 60)), eye.fovea, 0.13):
            _dot(drusen, (x, y), drusen_rng.uniform(0.008, 0.022) * r, 0.8)
        _paint(rgb, strength * _soften(drusen, 0.005 * r), (235, 205, 115))

    for x, y in _scatter(cotton_rng, eye, cotton_wool, pole, 0.3):  # fluffy pale patches
        for dx, dy in cotton_rng.normal(0, 0.015 * r, (3, 2)):
            _oval(white, (x + dx, y + dy), (0.035 * r, 0.022 * r), cotton_rng.uniform(0, 180), 0.85)
    _paint(rgb, strength * _soften(white, 0.012 * r), (240, 235, 215))

    if new_vessels:  # fine tortuous loops on and around the disc, and a few tufts elsewhere
        tufts = [eye.disc] * new_vessels + [tuple(p) for p in _scatter(growth_rng, eye, 2, pole, 0.3)]
        for centre in tufts:
            for _ in range(6):
                start = np.asarray(centre) + growth_rng.normal(0, 0.05 * r, 2)
                headings = growth_rng.uniform(0, 2 * math.pi) + np.cumsum(growth_rng.normal(0, 0.7, 18))
                points = start + np.cumsum(0.012 * r * np.stack([np.cos(headings), np.sin(headings)], 1), axis=0)
                cv2.polylines(growth, [np.round(points * 16).astype(np.int32)], False, 1.0, max(1, round(0.005 * r)),
                              cv2.LINE_AA, 4)
        _absorb(rgb, strength * growth, (0.35, 0.75, 0.7))


# ---- camera -----------------------------------------------------------------------------------------------------

def render_fundus(rng: np.random.Generator, size: int, *, eye: str, dr_grade: int, cdr: float, amd: bool,
                  site: SiteProfile, lesions: float = 1.0) -> tuple[np.ndarray, dict]:
    """Draw one phantom fundus photograph as ``site``'s camera would take it; ``lesions`` (0-1] scales the opacity
    of every disease sign (below 1: subtler lesions, a harder task).

    Returns
    -------
    rgb : H x W x 3 uint8; H = round(size * site.scale), W = H for the "circle" layout and 4/3 H for "clipped".
    geometry : dict with ``fov_cx``, ``fov_cy``, ``fov_r``, ``disc_x``, ``disc_y`` in that image's pixels.
    """
    if (eye not in ("L", "R") or dr_grade not in DR_SIGNS or not 0 < cdr < 1 or site.layout not in ("circle", "clipped")
            or not 0 < lesions <= 1):
        raise ValueError(f"bad phantom request: eye={eye!r} dr_grade={dr_grade!r} cdr={cdr!r} layout={site.layout!r} "
                         f"lesions={lesions!r}")
    anatomy_rng, lesion_rng, camera_rng = rng.spawn(3)
    clipped = site.layout == "clipped"
    height, width = size, round(size * 4 / 3) if clipped else size
    placed = _place_eye(anatomy_rng, height, width, size * (0.6 if clipped else 0.46), eye)
    rgb = _draw_fundus(anatomy_rng, placed, height, width, cdr)
    _draw_lesions(lesion_rng, rgb, placed, dr_grade, amd, lesions)

    yy, xx = np.arange(height, dtype=np.float32)[:, None], np.arange(width, dtype=np.float32)[None, :]
    distance = np.hypot(xx - placed.cx, yy - placed.cy)
    fov = np.clip(placed.r + 0.5 - distance, 0, 1).astype(np.float32)  # anti-aliased edge
    if site.notch:  # a small square tab astride the edge, up and to the right
        x, y, half = placed.cx + 0.707 * placed.r, placed.cy - 0.707 * placed.r, 0.045 * placed.r
        fov[max(round(y - half), 0):round(y + half), round(x - half):round(x + half)] = 1
    lighting = (1 - 0.5 * np.clip(distance / placed.r, 0, 1.2) ** 2.5) * fov  # vignetting
    lighting *= 1 + site.gradient * ((xx - placed.cx) * math.cos(site.gradient_angle)
                                     + (yy - placed.cy) * math.sin(site.gradient_angle)) / placed.r
    exposure = site.brightness * camera_rng.uniform(0.92, 1.08)  # no two shots are exposed quite alike
    rgb *= lighting[..., None] * (np.asarray(site.colour_cast, np.float32) * np.float32(exposure))
    if site.blur_sigma > 0:
        rgb = cv2.GaussianBlur(rgb, (0, 0), site.blur_sigma * size / 256)

    out_height = max(round(size * site.scale), 8)
    out_width = round(out_height * width / height)
    if (out_height, out_width) != (height, width):
        shrinking = out_height < height
        rgb = cv2.resize(rgb, (out_width, out_height), interpolation=cv2.INTER_AREA if shrinking else cv2.INTER_LINEAR)
    rgb += camera_rng.standard_normal(rgb.shape, dtype=np.float32) * np.float32(site.noise_sigma)
    image = np.clip(rgb, 0, 255).astype(np.uint8)
    if site.text_overlay:
        _burn_in_text(image, "OD 45deg" if eye == "R" else "OS 45deg")

    sx, sy = out_width / width, out_height / height  # pixel centres map as (x + 0.5) * s - 0.5
    return image, {"fov_cx": (placed.cx + 0.5) * sx - 0.5, "fov_cy": (placed.cy + 0.5) * sy - 0.5,
                   "fov_r": placed.r * sy,
                   "disc_x": (placed.disc[0] + 0.5) * sx - 0.5, "disc_y": (placed.disc[1] + 0.5) * sy - 0.5}


def _burn_in_text(image: np.ndarray, text: str) -> None:
    """Camera text in the top-left corner, 20% of the height wide: inside the black border for both layouts."""
    height = image.shape[0]
    thickness = max(1, round(height / 300))
    (text_width, text_height), _ = cv2.getTextSize(text, cv2.FONT_HERSHEY_SIMPLEX, 1.0, thickness)
    scale = 0.2 * height / text_width
    origin = (round(0.02 * height), round(0.02 * height + text_height * scale))
    cv2.putText(image, text, origin, cv2.FONT_HERSHEY_SIMPLEX, scale, (215, 215, 215), thickness, cv2.LINE_AA)


# ---- cohorts ----------------------------------------------------------------------------------------------------

def _draw_patient(rng: np.random.Generator, site: SiteProfile) -> dict:
    """Demographics and per-eye labels: fellow eyes have DR grades within one step of each other, and glaucoma and
    AMD grow more likely with age."""
    age = int(np.clip(round(rng.normal(site.age_mean, site.age_sd)), 18, 95))
    names, shares = zip(*site.ethnicity_mix)
    grade_probs = np.asarray(site.dr_grade_probs, float)
    grade = int(rng.choice(5, p=grade_probs / grade_probs.sum()))
    fellow = int(np.clip(grade + rng.choice([-1, 0, 1], p=[0.2, 0.6, 0.2]), 0, 4))
    prevalence = min(max(site.glaucoma_prevalence, 1e-3), 1 - 1e-3)
    glaucoma_odds = math.log(prevalence / (1 - prevalence)) + 0.06 * (age - site.age_mean)
    glaucoma = rng.random() < 1 / (1 + math.exp(-glaucoma_odds))
    amd = rng.random() < 0.6 / (1 + math.exp(-(age - 72) / 5))
    eyes = ("R", "L") if rng.random() < 0.5 else ("L", "R")  # which eye gets the drawn grade, and any disease first
    normal_cdr = rng.uniform(0.2, 0.45)
    labels = {}
    for first, eye in zip((True, False), eyes):
        glaucomatous = glaucoma and (first or rng.random() < 0.6)  # disease in one or both eyes
        labels[eye] = {"dr_grade": grade if first else fellow, "glaucoma": int(glaucomatous),
                       "amd": int(amd and (first or rng.random() < 0.7)),
                       "cdr": round(float(rng.uniform(0.6, 0.9) if glaucomatous
                                          else np.clip(normal_cdr + rng.normal(0, 0.03), 0.2, 0.5)), 2)}
    return {"sex": "F" if rng.random() < site.female_share else "M", "age": age,
            "ethnicity": names[int(rng.choice(len(names), p=np.asarray(shares) / sum(shares)))], "eyes": labels}


def generate_cohort(out: Path, sites: int, per_site: int, size: int = 256, seed: int = 0,
                    progress: Callable[[int], None] | None = None, lesions: float = 1.0) -> pd.DataFrame:
    """Write ``sites * per_site`` phantom photographs to ``out/images/*.jpg`` and their labels to
    ``out/labels.csv`` (columns :data:`LABEL_COLUMNS`); return the labels. Two eyes per patient, right first.
    ``lesions``: the disease signs' opacity (see :func:`render_fundus`)."""
    out = Path(out)
    (out / "images").mkdir(parents=True, exist_ok=True)
    rows = []
    for site_index, site in enumerate(site_profiles(sites, seed)):
        for image_index in range(per_site):
            patient_index, eye = image_index // 2, "RL"[image_index % 2]
            # the second eye draws its patient again: same generator, same patient
            patient = _draw_patient(_rng(seed, _PATIENT_STREAM, site_index, patient_index), site)
            labels = patient["eyes"][eye]
            rgb, _ = render_fundus(_rng(seed, _IMAGE_STREAM, site_index, image_index), size, eye=eye,
                                   dr_grade=labels["dr_grade"], cdr=labels["cdr"], amd=bool(labels["amd"]), site=site,
                                   lesions=lesions)
            path = f"images/{site.name}_P{patient_index + 1:04d}_{eye}.jpg"
            Image.fromarray(rgb).save(out / path, format="JPEG", quality=site.jpeg_quality)  # PIL writes no EXIF
            rows.append({"path": path, "patient_id": f"{site.name}-P{patient_index + 1:04d}", "eye": eye,
                         "site": site.name, "country": site.country, "sex": patient["sex"], "age": patient["age"],
                         "ethnicity": patient["ethnicity"], "device": site.device,
                         "referable_dr": int(labels["dr_grade"] >= REFERABLE_GRADE), **labels})
            if progress is not None:
                progress(1)
    table = pd.DataFrame(rows, columns=list(LABEL_COLUMNS))
    table.to_csv(out / "labels.csv", index=False)
    return table
