"""Safe image decoding: every file either becomes an RGB uint8 array or is rejected with a named reason.

Handles what real collections contain: zero-byte files, truncated JPEG/PNG, text files named ``.jpg``,
decompression bombs, CMYK, 16-bit, greyscale, RGBA/palette, EXIF-rotated photographs and DICOM ophthalmic
photographs. Large JPEGs are decoded in draft mode (DCT scaling) when the caller only needs a smaller image,
which is most of the cost saved by ``retfm data ingest``.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

DEFAULT_MAX_PIXELS = 64_000_000  # ~8000x8000: above any fundus camera, far below a decompression bomb

# Rejection reasons, as they appear in ingest_report.json.
EMPTY_FILE = "empty_file"
NOT_AN_IMAGE = "not_an_image"
TRUNCATED = "truncated"
TOO_MANY_PIXELS = "too_many_pixels"
UNREADABLE_DICOM = "unreadable_dicom"
UNREADABLE_FILE = "unreadable_file"
NO_FUNDUS = "no_fundus"
DUPLICATE = "duplicate"

# DICOM attributes retfm keeps (mapped to manifest columns or used for pseudonyms); every other tag is dropped,
# because outputs are re-encoded from pixels only.
DICOM_KEPT_TAGS = ("PatientID", "PatientSex", "PatientBirthDate", "StudyDate", "ImageLaterality", "Laterality",
                   "Modality", "Manufacturer", "ManufacturerModelName", "SOPInstanceUID")


class ImageRejected(Exception):
    """The file cannot become a fundus image; ``reason`` is one of the constants above."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


@dataclass
class Decoded:
    rgb: np.ndarray  # H x W x 3 uint8, upright
    source_size: tuple[int, int]  # (width, height) of the stored image, after EXIF rotation
    scale: float  # pixels of ``rgb`` per source pixel (< 1 after JPEG draft decoding)
    conversions: list[str] = field(default_factory=list)  # what was done to make it RGB: "cmyk", "16bit", ...
    dicom: dict[str, str] = field(default_factory=dict)  # DICOM_KEPT_TAGS that were present, as text


def decode_image(data: bytes, min_side: int | None = None, max_pixels: int = DEFAULT_MAX_PIXELS) -> Decoded:
    """Decode file bytes to RGB. ``min_side``: the caller needs at least this many pixels on the short side,
    so a JPEG may be decoded at 1/2, 1/4 or 1/8 scale. Raises :class:`ImageRejected`."""
    if len(data) == 0:
        raise ImageRejected(EMPTY_FILE, "zero bytes")
    if data[128:132] == b"DICM":
        return _decode_dicom(data, max_pixels)
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            image = Image.open(io.BytesIO(data))
        except (Image.DecompressionBombError, Image.DecompressionBombWarning):
            raise ImageRejected(TOO_MANY_PIXELS, f"more than {max_pixels} pixels") from None
        except UnidentifiedImageError:
            raise ImageRejected(NOT_AN_IMAGE, "not a recognised image format") from None
        except Exception as exc:  # a header too damaged to parse
            raise ImageRejected(TRUNCATED, f"{type(exc).__name__}: {exc}") from None
    width, height = image.size
    if width * height > max_pixels:
        raise ImageRejected(TOO_MANY_PIXELS, f"{width}x{height} exceeds the limit of {max_pixels} pixels")
    scale = 1.0
    try:
        orientation = image.getexif().get(0x0112, 1)  # PNG reads to its end to find EXIF: inside the try
        if min_side and image.format == "JPEG" and image.mode in ("RGB", "L", "CMYK"):
            factor = min(width, height) / min_side
            if factor >= 2:
                image.draft(image.mode, (int(np.ceil(width / factor)), int(np.ceil(height / factor))))
                scale = image.size[0] / width
        image.load()
    except Exception as exc:  # Pillow's decoders raise OSError, struct.error, zlib.error, EOFError, ... on bad data
        raise ImageRejected(TRUNCATED, f"{type(exc).__name__}: {exc}") from None
    conversions: list[str] = []
    if orientation not in (1, None):
        image = ImageOps.exif_transpose(image)
        conversions.append("exif_rotated")
    rgb = _to_rgb(image, conversions)
    source_size = (width, height) if orientation not in (5, 6, 7, 8) else (height, width)
    return Decoded(rgb, source_size, scale, conversions)


def _to_rgb(image: Image.Image, conversions: list[str]) -> np.ndarray:
    mode = image.mode
    if mode == "RGB":
        return np.asarray(image)
    if mode == "P" or mode == "PA":
        conversions.append("palette")
        image = image.convert("RGBA")
        mode = "RGBA"
    if mode in ("RGBA", "LA", "RGBa", "La"):
        conversions.append("alpha")
        # A transparent surround is black surround for a fundus: composite over black.
        rgba = np.asarray(image.convert("RGBA"), dtype=np.float32)
        if mode in ("LA", "La"):
            conversions.append("greyscale")
        return (rgba[..., :3] * (rgba[..., 3:4] / 255.0)).round().astype(np.uint8)
    if mode == "CMYK":
        conversions.append("cmyk")
        return np.asarray(image.convert("RGB"))
    if mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        conversions.append("16bit")
        return _grey_to_rgb(_stretch_to_uint8(np.asarray(image)))
    if mode in ("L", "1"):
        conversions.append("greyscale")
        return _grey_to_rgb(np.asarray(image.convert("L")))
    conversions.append(mode.lower())
    return np.asarray(image.convert("RGB"))


def _stretch_to_uint8(values: np.ndarray) -> np.ndarray:
    """Map integer or float intensities to 0-255 by the image's own maximum (12-bit data in 16-bit containers
    would otherwise look black)."""
    values = values.astype(np.float64)
    top = float(values.max()) if values.size else 0.0
    if top <= 0:
        return np.zeros(values.shape, dtype=np.uint8)
    return np.clip(values / top * 255.0, 0, 255).round().astype(np.uint8)


def _grey_to_rgb(grey: np.ndarray) -> np.ndarray:
    return np.repeat(grey[..., None], 3, axis=2)


def _decode_dicom(data: bytes, max_pixels: int) -> Decoded:
    import pydicom
    from pydicom.errors import InvalidDicomError

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # pydicom warns about every oddity; a failure is reported below
            dataset = pydicom.dcmread(io.BytesIO(data))
        rows, columns = int(dataset.Rows), int(dataset.Columns)
    except (InvalidDicomError, AttributeError, KeyError, ValueError, TypeError, EOFError, OSError) as exc:
        raise ImageRejected(UNREADABLE_DICOM, f"cannot parse DICOM ({type(exc).__name__})") from None
    if rows * columns > max_pixels:
        raise ImageRejected(TOO_MANY_PIXELS, f"{columns}x{rows} exceeds the limit of {max_pixels} pixels")
    try:
        pixels = dataset.pixel_array
    except Exception as exc:  # pydicom raises many types for missing/compressed/corrupt pixel data
        raise ImageRejected(UNREADABLE_DICOM, f"no decodable pixel data ({type(exc).__name__})") from None
    conversions = ["dicom"]
    frames = int(getattr(dataset, "NumberOfFrames", 1) or 1)
    if frames > 1:
        pixels = pixels[0]
        conversions.append("first_frame")
    photometric = str(getattr(dataset, "PhotometricInterpretation", "RGB"))
    if photometric.startswith("YBR"):
        from pydicom.pixels import convert_color_space

        pixels = convert_color_space(pixels, photometric, "RGB")
    if pixels.dtype != np.uint8:
        conversions.append("16bit")
        pixels = _stretch_to_uint8(pixels)
    if pixels.ndim == 2:
        if photometric == "MONOCHROME1":
            pixels = 255 - pixels
        conversions.append("greyscale")
        pixels = _grey_to_rgb(pixels)
    tags = {name: str(getattr(dataset, name)) for name in DICOM_KEPT_TAGS if str(getattr(dataset, name, "") or "")}
    return Decoded(np.ascontiguousarray(pixels[..., :3]), (columns, rows), 1.0, conversions, tags)


def write_image(rgb: np.ndarray, path: Path, jpeg_quality: int = 95) -> None:
    """Encode by the path's suffix (.png lossless, .jpg) from pixels only, so no metadata of any source can
    survive; written to a temporary file, then renamed."""
    import cv2

    params = [cv2.IMWRITE_PNG_COMPRESSION, 3] if path.suffix == ".png" else [cv2.IMWRITE_JPEG_QUALITY, jpeg_quality]
    ok, encoded = cv2.imencode(path.suffix, np.ascontiguousarray(rgb[..., ::-1]), params)
    if not ok:
        raise OSError(f"could not encode an image as {path.suffix}")
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(encoded.tobytes())
    tmp.replace(path)
