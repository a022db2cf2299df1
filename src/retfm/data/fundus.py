"""Fundus photograph preprocessing: find the circular field of view (FOV), crop to it, resize, score quality.

Detection (:func:`find_fov`) runs on a copy shrunk by an integer factor to at most 256 px, so it costs a few
milliseconds at any size:

1. brightness = max over the colour channels, lightly blurred; an image that is uniform, or whose variation
   is pixel-scale noise rather than structure, holds no fundus;
2. the surround level is the 2nd percentile of brightness, the fundus level the median of what is clearly
   brighter; when even the darkest pixels are fundus (no black surround), the fundus fills the frame
   (``full_frame``: centre = image centre, radius = max(h, w) / 2);
3. the edge threshold sits a quarter of the way from surround to fundus level, so dark (under-exposed) fundus
   images count; where no circle fits, lower levels follow a periphery in shadow;
4. the outer contour of the largest bright region is taken, minus its points lying on the image frame (a
   circle clipped by the frame has straight edges there), and a circle is fitted robustly: RANSAC over
   point triples, then least squares with outlier rejection (notches, overlays touching the FOV);
5. the fit must explain most of the contour with small residuals, have points all around, and agree with
   the region's area, or there is no fundus.

Quality (:func:`quality`), each score in [0, 1], measured inside the FOV of the original image after
resizing the FOV crop to 256 px, so that scores do not depend on the image size:

- ``quality_exposure``: share of FOV pixels neither dark (max channel < 20) nor saturated (> 250), times a
  band score for the mean max channel (1 between 60 and 220, falling linearly to 0 at 10 and 255);
- ``quality_sharpness``: ``1 - exp(-v / 60)`` with ``v`` the variance of the Laplacian of the green channel
  (inner 92% of the radius, so the FOV edge does not count); a sharp fundus scores > 0.6, the same fundus
  blurred by a Gaussian of sigma 4 px at 256 px scores well under 0.2. Noise also raises it;
- ``fov_fraction``: the fraction of the FOV disc inside the image frame (1 for a whole circle);
- ``quality``: the geometric mean of the three.

A full-frame fundus is scored over the whole frame. A FOV under 256 px across is scaled up for the
measure, so small images (RetinaMNIST: 28 px) score low sharpness: they hold no fine detail.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

WORK_SIDE = 256  # detection and quality both run at about this many pixels
EDGE_LEVELS = (0.25, 0.15, 0.1)  # FOV edge thresholds, as fractions of the way from surround to fundus brightness
DARK_LEVEL, SATURATED_LEVEL = 20, 250
SHARPNESS_SCALE = 60.0  # Laplacian variance (green, 256 px) that scores 1 - 1/e


@dataclass(frozen=True)
class FieldOfView:
    cx: float  # circle centre, pixels of the analysed image
    cy: float
    radius: float
    full_frame: bool  # no dark surround: the fundus fills the frame; centre = image centre, radius = max(h, w) / 2


def _check_rgb(rgb: np.ndarray) -> None:
    if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype != np.uint8 or 0 in rgb.shape:
        raise ValueError(f"expected an H x W x 3 uint8 image, got {rgb.dtype} {rgb.shape}")


def _resize_fast(image: np.ndarray, width: int, height: int) -> np.ndarray:
    """Resize for measuring, not for output. A large shrink first goes through an integer factor (cv2's fast
    path, 2x faster), leaving a ratio of at least 2 to the last step so the result stays close to a plain area
    resize; up to factor - 1 rows and columns are dropped, less than one output pixel."""
    factor = min(image.shape[1] // width, image.shape[0] // height) // 2
    if factor > 1:
        rows, columns = image.shape[0] // factor, image.shape[1] // factor
        image = cv2.resize(image[:rows * factor, :columns * factor], (columns, rows), interpolation=cv2.INTER_AREA)
    shrinking = width * height < image.shape[0] * image.shape[1]
    return cv2.resize(image, (width, height), interpolation=cv2.INTER_AREA if shrinking else cv2.INTER_LINEAR)


# ---- detection ---------------------------------------------------------------------------------------------------

def find_fov(rgb: np.ndarray) -> FieldOfView | None:
    """The circular field of view, or None when the image holds no detectable fundus."""
    _check_rgb(rgb)
    height, width = rgb.shape[:2]
    # An integer shrink factor keeps cv2 on its fast path (3x faster than to exactly 256 px) and the pixel
    # mapping exact; the last factor - 1 rows and columns are dropped, less than one work pixel.
    factor = -(-max(height, width) // WORK_SIDE)
    small = rgb
    if factor > 1:
        small = cv2.resize(rgb[:height - height % factor, :width - width % factor],
                           (width // factor, height // factor), interpolation=cv2.INTER_AREA)
    brightness = cv2.GaussianBlur(small.max(axis=2), (0, 0), 1.0)
    spread = float(brightness.std())
    if spread < 3 or _roughness(brightness) > 0.55:
        return None  # all dark, uniform, or noise

    # The surround is at least ~2% of any framed fundus image, and its darkest part. The fundus level is the
    # median of what is clearly brighter: robust to bright text and logos, which Otsu would split off instead.
    surround = float(np.percentile(brightness, 2))
    brighter = brightness[brightness > surround + 8]
    if brighter.size < 0.05 * brightness.size:
        return None
    fundus = float(np.median(brighter))
    if surround > 0.4 * fundus:  # even the darkest pixels are fundus: nothing black around it
        return _full_frame(height, width)
    # A quarter of the way from surround to fundus brightness catches most edges; a periphery in shadow or
    # vignetted needs a lower level, tried next.
    coverage = 0.0
    for edge_level in EDGE_LEVELS:
        region, contour = _largest_region(brightness > surround + edge_level * (fundus - surround))
        coverage = max(coverage, float(region.mean()))
        if coverage > 0.97:
            return _full_frame(height, width)
        circle = _fit_fov_circle(contour, region)
        if circle is not None:
            break
    else:
        # No circle, yet bright nearly everywhere: a fundus filling the frame, with a dark patch at its edge.
        return _full_frame(height, width) if coverage > 0.9 else None
    cx, cy, radius = circle
    # Back to input pixels: work pixel i covers input pixels [i, i + 1) * factor, centred on (i + 0.5) * factor - 0.5.
    return FieldOfView((cx + 0.5) * factor - 0.5, (cy + 0.5) * factor - 0.5, radius * factor, False)


def _full_frame(height: int, width: int) -> FieldOfView:
    return FieldOfView((width - 1) / 2, (height - 1) / 2, max(height, width) / 2, True)


def _roughness(brightness: np.ndarray) -> float:
    """Share of the variation that is pixel-scale: ~0.7 for noise, under 0.4 for a fundus (its edge and vessels
    are a small part of its variation), even at 28 px."""
    image = brightness.astype(np.float32)
    detail = image - cv2.GaussianBlur(image, (0, 0), 2.0)
    return float(detail.std() / (image.std() + 1e-6))


def _largest_region(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The largest bright region with its holes filled (dark macula, vessels), and its outer contour (N x 2)."""
    contours, _ = cv2.findContours(mask.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
    if not contours:
        return np.zeros(mask.shape, bool), np.zeros((0, 2))
    largest = max(contours, key=cv2.contourArea)
    region = np.zeros(mask.shape, np.uint8)
    cv2.drawContours(region, [largest], -1, 1, thickness=cv2.FILLED)
    return region.astype(bool), largest.reshape(-1, 2).astype(np.float64)


def _fit_fov_circle(contour: np.ndarray, region: np.ndarray) -> tuple[float, float, float] | None:
    """Circle (cx, cy, r) in work pixels through the contour points off the frame, or None if it is no circle."""
    height, width = region.shape
    x, y = contour[:, 0], contour[:, 1]
    points = contour[(x > 1) & (x < width - 2) & (y > 1) & (y < height - 2)]
    if len(points) < 12:
        return None
    tolerance = max(1.5, 0.01 * min(height, width))  # contour jitter: pixel steps, JPEG, a fuzzy edge
    cx, cy, radius = _ransac_circle(points, tolerance)
    for _ in range(10):
        # Least squares on the points near the circle. The limit follows the residual spread (MAD) but never
        # exceeds 5% of the radius, else a square or an ellipse would end up as all inliers.
        residual = np.abs(np.hypot(points[:, 0] - cx, points[:, 1] - cy) - radius)
        limit = max(tolerance, min(3 * 1.4826 * float(np.median(residual)), 0.05 * radius))
        inliers = residual <= limit
        if inliers.sum() < 12:
            return None
        refit = _least_squares_circle(points[inliers])
        converged = np.allclose(refit, (cx, cy, radius), atol=0.01)
        cx, cy, radius = refit
        if converged:
            break

    residual = np.abs(np.hypot(points[inliers, 0] - cx, points[inliers, 1] - cy) - radius)
    round_enough = 1.4826 * float(np.median(residual)) <= max(1.0, 0.015 * radius)
    # Inliers all around (a clipped circle keeps two side arcs, or four corner arcs), not one arc alone.
    angles = np.sort(np.arctan2(points[inliers, 1] - cy, points[inliers, 0] - cx))
    widest_gap = np.diff(np.append(angles, angles[0] + 2 * np.pi)).max()
    yy, xx = np.ogrid[:height, :width]
    disc = (xx - cx) ** 2 + (yy - cy) ** 2 <= radius ** 2
    overlap = np.count_nonzero(disc & region) / max(1, np.count_nonzero(disc | region))
    plausible = (inliers.mean() >= 0.5 and round_enough and widest_gap <= np.pi and overlap >= 0.65
                 and 0 <= cx < width and 0 <= cy < height
                 and 0.1 * min(height, width) <= radius <= 0.5 * np.hypot(height, width))
    return (float(cx), float(cy), float(radius)) if plausible else None


def _least_squares_circle(points: np.ndarray) -> tuple[float, float, float]:
    """Algebraic (Kasa) fit: x^2 + y^2 = 2 cx x + 2 cy y + c, solved around the points' mean for conditioning."""
    mean = points.mean(axis=0)
    u, v = (points - mean).T
    a = np.column_stack([2 * u, 2 * v, np.ones_like(u)])
    (cu, cv, c), *_ = np.linalg.lstsq(a, u * u + v * v, rcond=None)
    return float(cu + mean[0]), float(cv + mean[1]), float(np.sqrt(max(c + cu * cu + cv * cv, 0.0)))


def _ransac_circle(points: np.ndarray, tolerance: float, tries: int = 64) -> tuple[float, float, float]:
    """The circle through three contour points that most others agree with: a starting point that a notch
    or an overlay owning part of the contour cannot drag, as it can drag a plain least-squares fit."""
    rng = np.random.default_rng(0)  # deterministic: the same image always gives the same circle
    p1, p2, p3 = (points[rng.integers(0, len(points), tries)] for _ in range(3))
    # Circumcentre of each triple.
    d = 2 * (p1[:, 0] * (p2[:, 1] - p3[:, 1]) + p2[:, 0] * (p3[:, 1] - p1[:, 1]) + p3[:, 0] * (p1[:, 1] - p2[:, 1]))
    s1, s2, s3 = (p1 ** 2).sum(1), (p2 ** 2).sum(1), (p3 ** 2).sum(1)
    valid = np.abs(d) > 1e-6
    d = np.where(valid, d, 1.0)
    cx = (s1 * (p2[:, 1] - p3[:, 1]) + s2 * (p3[:, 1] - p1[:, 1]) + s3 * (p1[:, 1] - p2[:, 1])) / d
    cy = (s1 * (p3[:, 0] - p2[:, 0]) + s2 * (p1[:, 0] - p3[:, 0]) + s3 * (p2[:, 0] - p1[:, 0])) / d
    radius = np.hypot(p1[:, 0] - cx, p1[:, 1] - cy)
    distance = np.hypot(points[None, :, 0] - cx[:, None], points[None, :, 1] - cy[:, None])
    support = (np.abs(distance - radius[:, None]) <= tolerance).sum(1) * valid
    if support.max() < 3:
        return _least_squares_circle(points)
    best = int(np.argmax(support))
    return float(cx[best]), float(cy[best]), float(radius[best])


# ---- cropping, resizing, contrast ---------------------------------------------------------------------------------

def crop_to_fov(rgb: np.ndarray, fov: FieldOfView, margin: float = 0.02) -> np.ndarray:
    """Square crop centred on the FOV, side 2 * radius * (1 + margin), black where it leaves the image."""
    side = max(1, round(2 * fov.radius * (1 + margin)))
    left, top = round(fov.cx - (side - 1) / 2), round(fov.cy - (side - 1) / 2)
    out = np.zeros((side, side) + rgb.shape[2:], rgb.dtype)
    x0, y0 = max(left, 0), max(top, 0)
    x1, y1 = min(left + side, rgb.shape[1]), min(top + side, rgb.shape[0])
    if x1 > x0 and y1 > y0:
        out[y0 - top:y1 - top, x0 - left:x1 - left] = rgb[y0:y1, x0:x1]
    return out


def resize_square(rgb: np.ndarray, size: int) -> np.ndarray:
    """Antialiased shrink of a square image to size x size; a smaller image is returned unchanged."""
    if rgb.shape[0] != rgb.shape[1]:
        raise ValueError(f"expected a square image, got {rgb.shape[1]}x{rgb.shape[0]}")
    if rgb.shape[0] <= size:
        return rgb
    return cv2.resize(rgb, (size, size), interpolation=cv2.INTER_AREA)


def apply_clahe(rgb: np.ndarray, clip_limit: float = 2.0, tile_grid: int = 8) -> np.ndarray:
    """Contrast-limited adaptive histogram equalisation of lightness only, so colours keep their hue."""
    lab = cv2.cvtColor(rgb, cv2.COLOR_RGB2LAB)
    clahe = cv2.createCLAHE(clipLimit=clip_limit, tileGridSize=(tile_grid, tile_grid))
    lab[..., 0] = clahe.apply(np.ascontiguousarray(lab[..., 0]))
    return cv2.cvtColor(lab, cv2.COLOR_LAB2RGB)


# ---- quality ------------------------------------------------------------------------------------------------------

def quality(rgb: np.ndarray, fov: FieldOfView) -> dict[str, float]:
    """Exposure, sharpness, visible share of the FOV and their geometric mean, all in [0, 1] (module docstring)."""
    _check_rgb(rgb)
    thumbnail, inside = _fov_thumbnail(rgb, fov)
    value = thumbnail.max(axis=2)[inside].astype(np.float32)
    if value.size == 0:
        return {"quality_exposure": 0.0, "quality_sharpness": 0.0, "fov_fraction": 0.0, "quality": 0.0}
    well_exposed = float(np.mean((value >= DARK_LEVEL) & (value <= SATURATED_LEVEL)))
    mean = float(value.mean())
    band = float(np.clip(min((mean - 10) / 50, (255 - mean) / 35), 0, 1))
    exposure = well_exposed * band

    laplacian = cv2.Laplacian(thumbnail[..., 1].astype(np.float32), cv2.CV_32F)
    sharpness = 1 - float(np.exp(-float(laplacian[inside].var()) / SHARPNESS_SCALE))

    fraction = _disc_fraction_in_frame(fov, *rgb.shape[:2])
    overall = float((exposure * sharpness * fraction) ** (1 / 3))
    return {"quality_exposure": exposure, "quality_sharpness": sharpness, "fov_fraction": fraction,
            "quality": overall}


def _fov_thumbnail(rgb: np.ndarray, fov: FieldOfView) -> tuple[np.ndarray, np.ndarray]:
    """The FOV's square crop at WORK_SIDE px and a mask of the FOV pixels in it that lie inside the image.

    Only the part inside the image is resized and pasted onto black, which avoids padding at full resolution.
    """
    height, width = rgb.shape[:2]
    side = 2 * fov.radius
    left, top = fov.cx + 0.5 - fov.radius, fov.cy + 0.5 - fov.radius  # crop edges, in pixel-edge coordinates
    x0, y0 = max(0, round(left)), max(0, round(top))
    x1, y1 = min(width, round(left + side)), min(height, round(top + side))
    scale = WORK_SIDE / side
    thumbnail = np.zeros((WORK_SIDE, WORK_SIDE, 3), np.uint8)
    inside = np.zeros((WORK_SIDE, WORK_SIDE), bool)
    tx0, ty0, tx1, ty1 = (min(WORK_SIDE, max(0, round((v - o) * scale)))
                          for v, o in ((x0, left), (y0, top), (x1, left), (y1, top)))
    if tx1 <= tx0 or ty1 <= ty0:
        return thumbnail, inside
    thumbnail[ty0:ty1, tx0:tx1] = _resize_fast(rgb[y0:y1, x0:x1], tx1 - tx0, ty1 - ty0)
    edge = 3  # pixels next to the frame or the padding see a step that is not image detail
    inside[ty0 + edge:ty1 - edge, tx0 + edge:tx1 - edge] = True
    if not fov.full_frame:
        yy, xx = np.ogrid[:WORK_SIDE, :WORK_SIDE]
        centre = (WORK_SIDE - 1) / 2
        inside &= (xx - centre) ** 2 + (yy - centre) ** 2 <= (0.92 * WORK_SIDE / 2) ** 2
    return thumbnail, inside


def _disc_fraction_in_frame(fov: FieldOfView, height: int, width: int, samples: int = 1024) -> float:
    """Share of the disc's area inside the frame [-0.5, w - 0.5] x [-0.5, h - 0.5], integrated over columns."""
    x = fov.cx + fov.radius * np.linspace(-1, 1, samples + 1)[:-1] + fov.radius / samples  # column midpoints
    half_chord = np.sqrt(np.maximum(fov.radius ** 2 - (x - fov.cx) ** 2, 0))
    visible = np.clip(np.minimum(fov.cy + half_chord, height - 0.5) - np.maximum(fov.cy - half_chord, -0.5), 0, None)
    visible *= (x >= -0.5) & (x <= width - 0.5)
    return float(np.clip(visible.sum() / (2 * half_chord).sum(), 0, 1))


# ---- the whole step -----------------------------------------------------------------------------------------------

def preprocess(rgb: np.ndarray, size: int, margin: float = 0.02,
               clahe: bool = False) -> tuple[np.ndarray, dict[str, float]] | None:
    """Find the FOV, crop to it, shrink to at most size x size (then CLAHE); None when there is no fundus.

    The info dict holds the FOV geometry in the input image's pixels and the :func:`quality` scores.
    """
    fov = find_fov(rgb)
    if fov is None:
        return None
    image = resize_square(crop_to_fov(rgb, fov, margin), size)
    if clahe:
        image = apply_clahe(image)
    info = {"fov_cx": fov.cx, "fov_cy": fov.cy, "fov_radius": fov.radius, "fov_full_frame": float(fov.full_frame)}
    info.update(quality(rgb, fov))
    return image, info
