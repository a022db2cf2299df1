"""Field-of-view detection, cropping, resizing, CLAHE and quality scores on synthetic and real fundus images."""

from __future__ import annotations

import io
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image

from retfm.data.fundus import FieldOfView, apply_clahe, crop_to_fov, find_fov, preprocess, quality, resize_square

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def jpeg_round_trip(rgb: np.ndarray, quality: int = 90) -> np.ndarray:
    buffer = io.BytesIO()
    Image.fromarray(rgb).save(buffer, format="JPEG", quality=quality)
    return np.array(Image.open(io.BytesIO(buffer.getvalue())).convert("RGB"))


def synthetic_fundus(height: int, width: int, cx: float, cy: float, radius: float, *, gain: float = 1.0,
                     border_noise: int = 10, notch: bool = False, text: bool = False, seed: int = 0) -> np.ndarray:
    """An orange disc (edge exactly at ``radius``) with fall-off, vessels, a dark macula and noise, on a noisy
    black surround, JPEG-compressed. ``notch``: a camera's rectangular tab at the top right of the edge;
    ``text``: burned-in white text in two corners of the surround."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:height, :width].astype(np.float32)
    distance = np.hypot(xx - cx, yy - cy)
    fov = np.clip(radius + 0.5 - distance, 0, 1)  # antialiased edge
    if notch:
        tab_x, tab_y = cx + 0.7 * radius, cy - 0.7 * radius
        fov[int(tab_y - 0.05 * radius):int(tab_y), int(tab_x):int(tab_x + 0.08 * radius)] = 1
        fov = np.maximum(fov, np.clip(radius + 0.5 - distance, 0, 1))
    shading = 1 - 0.45 * (distance / radius) ** 2
    shading -= 0.35 * np.exp(-((xx - cx - 0.1 * radius) ** 2 + (yy - cy) ** 2) / (0.12 * radius) ** 2)  # macula
    vessels = np.zeros((height, width), np.float32)
    for _ in range(8):
        angle = rng.uniform(0, 2 * np.pi)
        start = (int(cx - 0.3 * radius), int(cy))
        end = (int(cx + 0.95 * radius * np.cos(angle)), int(cy + 0.95 * radius * np.sin(angle)))
        cv2.line(vessels, start, end, 1.0, max(1, int(radius / 60)), lineType=cv2.LINE_AA)
    shading *= 1 - 0.45 * vessels
    rgb = fov[..., None] * shading[..., None] * np.array([205, 95, 45], np.float32) * gain
    rgb += rng.normal(0, 2, rgb.shape) * fov[..., None]
    rgb += rng.uniform(0, border_noise, (height, width, 1)) * (1 - fov[..., None])
    rgb = np.clip(rgb, 0, 255).astype(np.uint8)
    if text:
        scale, thickness = height / 500, max(1, height // 250)
        cv2.putText(rgb, "OD 2021-03-04", (5, height - 15), cv2.FONT_HERSHEY_SIMPLEX, scale, (255, 255, 255), thickness)
        cv2.putText(rgb, "LOGO", (width - int(140 * scale), int(40 * scale)), cv2.FONT_HERSHEY_SIMPLEX, scale,
                    (230, 230, 230), thickness)
    return jpeg_round_trip(rgb)


CASES = {  # name: (image size, true circle, options)
    "full circle": ((720, 720), (359.5, 359.5, 330), {}),
    "clipped top and bottom": ((720, 960), (479.5, 359.5, 410), {}),
    "notch": ((720, 720), (359.5, 359.5, 330), {"notch": True}),
    "text in the border": ((720, 720), (359.5, 359.5, 300), {"text": True}),
    "dark": ((720, 720), (359.5, 359.5, 330), {"gain": 0.15, "border_noise": 5}),
    "off centre": ((800, 1000), (380.0, 430.0, 300), {}),
    "small": ((96, 96), (47.5, 47.5, 42), {}),
}


@pytest.mark.parametrize("name", CASES)
def test_circle_is_recovered_within_two_percent_of_the_radius(name):
    (height, width), (cx, cy, radius), options = CASES[name]
    rgb = synthetic_fundus(height, width, cx, cy, radius, **options)
    fov = find_fov(rgb)
    assert fov is not None and not fov.full_frame
    assert abs(fov.cx - cx) < 0.02 * radius and abs(fov.cy - cy) < 0.02 * radius
    assert abs(fov.radius - radius) < 0.02 * radius


def test_dark_case_is_really_dark():
    rgb = synthetic_fundus(720, 720, 359.5, 359.5, 330, gain=0.15, border_noise=5)
    yy, xx = np.mgrid[:720, :720]
    distance = np.hypot(xx - 359.5, yy - 359.5)
    brightness = rgb.max(axis=2)
    assert 15 < brightness[distance < 320].mean() < 35 and brightness[distance > 340].max() < 12


def test_fundus_filling_the_frame_is_full_frame():
    rgb = synthetic_fundus(600, 800, 399.5, 299.5, 900)
    assert find_fov(rgb) == FieldOfView(399.5, 299.5, 400.0, True)


@pytest.mark.parametrize("name", ["black", "grey", "noise 64", "noise 512", "square", "ellipse"])
def test_no_fundus_gives_none(name):
    rng = np.random.default_rng(1)
    images = {
        "black": np.zeros((300, 300, 3), np.uint8),
        "grey": np.full((300, 300, 3), 128, np.uint8),
        "noise 64": rng.integers(0, 256, (64, 64, 3), dtype=np.uint8),
        "noise 512": rng.integers(0, 256, (512, 512, 3), dtype=np.uint8),
        "square": cv2.rectangle(np.zeros((400, 400, 3), np.uint8), (80, 80), (320, 320), (200, 100, 50), -1),
        "ellipse": cv2.ellipse(np.zeros((400, 400, 3), np.uint8), (200, 200), (170, 100), 0, 0, 360,
                               (200, 100, 50), -1),
    }
    assert find_fov(images[name]) is None


def test_crop_is_a_square_centred_on_the_circle():
    rgb = synthetic_fundus(720, 960, 479.5, 359.5, 410)  # clipped: the crop needs black padding
    fov = find_fov(rgb)
    crop = crop_to_fov(rgb, fov, margin=0.05)
    side = round(2 * fov.radius * 1.05)
    assert crop.shape == (side, side, 3)
    centred = find_fov(crop)
    assert abs(centred.cx - (side - 1) / 2) < 0.02 * fov.radius and abs(centred.cy - (side - 1) / 2) < 0.02 * fov.radius
    assert abs(centred.radius - fov.radius) < 0.02 * fov.radius
    assert crop[:20].max() == 0 and crop[-20:].max() == 0  # padding where the circle left the frame


def test_resize_never_upscales_and_is_antialiased():
    small = np.zeros((100, 100, 3), np.uint8)
    assert resize_square(small, 256) is small
    checkerboard = ((np.indices((512, 512)).sum(axis=0) % 2) * 255).astype(np.uint8)
    shrunk = resize_square(np.repeat(checkerboard[..., None], 3, axis=2), 100)
    assert shrunk.shape == (100, 100, 3)
    assert abs(shrunk.mean() - 127.5) < 3 and shrunk.std() < 10  # aliasing would leave stripes of 0 and 255


def test_quality_scores_respond_to_blur_darkness_and_clipping():
    radius = 330
    rgb = synthetic_fundus(720, 720, 359.5, 359.5, radius)
    base = quality(rgb, find_fov(rgb))
    assert all(0 <= v <= 1 for v in base.values()) and base["fov_fraction"] == pytest.approx(1.0)

    blurred = cv2.GaussianBlur(rgb, (0, 0), 4 * 2 * radius / 256)  # sigma 4 px at 256 px
    assert quality(blurred, find_fov(blurred))["quality_sharpness"] < base["quality_sharpness"] - 0.3

    dark = (rgb * 0.15).astype(np.uint8)
    assert quality(dark, find_fov(dark))["quality_exposure"] < base["quality_exposure"] - 0.3

    clipped = synthetic_fundus(720, 960, 479.5, 359.5, 410)
    fraction = quality(clipped, find_fov(clipped))["fov_fraction"]
    assert 0.85 < fraction < 0.95  # the two caps cut off by the frame are ~9% of the disc


def test_clahe_raises_local_contrast():
    yy, xx = np.mgrid[:256, :256]
    grey = 110 + 10 * np.sin(xx / 9.0) * np.cos(yy / 13.0)
    flat = np.repeat(grey[..., None], 3, axis=2).astype(np.uint8)
    enhanced = apply_clahe(flat)
    assert enhanced.shape == flat.shape and enhanced.dtype == np.uint8
    assert enhanced.std() > 2 * flat.std()


def test_preprocess_crops_resizes_and_reports_in_input_pixels():
    rgb = synthetic_fundus(720, 960, 479.5, 359.5, 410)
    image, info = preprocess(rgb, 256)
    assert image.shape == (256, 256, 3)
    fov = find_fov(rgb)
    assert (info["fov_cx"], info["fov_cy"], info["fov_radius"]) == (fov.cx, fov.cy, fov.radius)
    assert info["fov_full_frame"] == 0
    assert set(info) == {"fov_cx", "fov_cy", "fov_radius", "fov_full_frame", "quality_exposure", "quality_sharpness",
                         "fov_fraction", "quality"}
    enhanced, _ = preprocess(rgb, 256, clahe=True)
    assert not np.array_equal(enhanced, image)
    small_image, _ = preprocess(synthetic_fundus(96, 96, 47.5, 47.5, 42), 256)
    assert small_image.shape[0] < 96  # never upscaled
    assert preprocess(np.zeros((200, 200, 3), np.uint8), 256) is None


def test_real_fundus_with_notch():
    path = SHARED_DATA / "retina_cc0.jpg"
    if not path.exists():
        pytest.skip(f"{path} not present")
    rgb = np.asarray(Image.open(path).convert("RGB"))
    fov = find_fov(rgb)
    # Measured on the photograph: half-maximum of the edge at 695-696 px from (704, 703) in every direction.
    assert fov is not None and not fov.full_frame
    assert abs(fov.cx - 704) < 0.02 * 696 and abs(fov.cy - 703) < 0.02 * 696
    assert 0.95 * 696 < fov.radius < 1.01 * 696
    scores = quality(rgb, fov)
    assert scores["quality_sharpness"] > 0.6 and scores["fov_fraction"] > 0.99
    blurred = cv2.GaussianBlur(rgb, (0, 0), 4 * 2 * fov.radius / 256)
    assert quality(blurred, fov)["quality_sharpness"] < 0.3


def test_retinamnist_images_all_have_a_fundus():
    path = SHARED_DATA / "retinamnist.npz"
    if not path.exists():
        pytest.skip(f"{path} not present")
    data = np.load(path)
    for split in ("train", "val", "test"):
        images = data[f"{split}_images"]
        missed = [i for i, image in enumerate(images) if find_fov(image) is None]
        assert missed == [], f"{split}: no fundus found in {missed[:10]}"


def test_phantom_fields_of_view_are_found_for_every_site_style():
    """Every camera style of the phantom sites (dark, clipped, notch, text overlay) against the drawn circle."""
    from retfm.data.phantoms import render_fundus, site_profiles

    for k, site in enumerate(site_profiles(6, seed=0)):
        rgb, geometry = render_fundus(np.random.default_rng(k), 256, eye="L", dr_grade=k % 5, cdr=0.5, amd=False,
                                      site=site)
        fov = find_fov(rgb)
        assert fov is not None and not fov.full_frame, site.name
        radius = geometry["fov_r"]
        assert abs(fov.cx - geometry["fov_cx"]) < 0.02 * radius and abs(fov.cy - geometry["fov_cy"]) < 0.02 * radius
        assert abs(fov.radius - radius) < 0.02 * radius, site.name
