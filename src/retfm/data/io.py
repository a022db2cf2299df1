"""Safe image decoding: every file either becomes an RGB uint8 array or is rejected with a named reason.

Handles what real collections contain: zero-byte files, truncated JPEG/PNG, text files named ``.jpg``,
decompression bombs, CMYK, 16-bit, greyscale, RGBA/palette, EXIF-rotated photographs and DICOM ophthalmic
photographs. Large JPEGs are decoded in draft mode (DCT scaling) when the caller only needs a smaller image,
which is most of the cost saved by ``retfm data ingest``.
"""

from __future__ import annotations

import io
import warnings
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

DEFAULT_MAX_PIXELS = 64_000_000  # ~8000x8000: above any fundus camera, far below a decompression bomb
DICOM_HEADER_BYTES = 16 << 20  # inflated before a deflated DICOM's header is known: more than any real header

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
    image = open_image(data, max_pixels)
    width, height = image.size
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


def largest_file(max_pixels: int) -> int:
    """Bytes no image within the limit needs: 16-bit RGBA stored uncompressed, plus a DICOM header. Ingest
    refuses a larger file before reading it."""
    return 8 * max_pixels + DICOM_HEADER_BYTES


def open_image(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Pillow's lazy open, which reads the header only, refused with a named reason before a pixel is decoded:
    not an image, a header too damaged to parse, or more than ``max_pixels`` pixels (PNG, TIFF, JPEG, GIF bombs
    alike). Every decoder in retfm opens images through here."""
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
    _refuse_above(width * height, max_pixels, f"{width}x{height}")
    return image


def _refuse_above(pixels: int, max_pixels: int, what: str) -> None:
    """The one size check, made from headers before anything is allocated."""
    if pixels > max_pixels:
        raise ImageRejected(TOO_MANY_PIXELS, f"{what} exceeds the limit of {max_pixels} pixels")


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
    top = float(values.max()) if values.size else 0.0
    if top <= 0:
        return np.zeros(values.shape, dtype=np.uint8)
    scaled = values.astype(np.float32)  # float32 is exact for 16-bit data and half float64's memory
    scaled *= np.float32(255.0 / top)
    return np.clip(scaled, 0, 255, out=scaled).round(out=scaled).astype(np.uint8)


def _grey_to_rgb(grey: np.ndarray) -> np.ndarray:
    return np.repeat(grey[..., None], 3, axis=2)


def _decode_dicom(data: bytes, max_pixels: int) -> Decoded:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pydicom warns about every oddity; a failure is reported below
        dataset, frames = _read_dicom(data, max_pixels)
        try:
            dataset.pixel_array_options(index=0)  # only the first frame is decoded, however many there are
            pixels = dataset.pixel_array  # in RGB when stored as YBR
        except Exception as exc:  # pydicom raises many types for missing/compressed/corrupt pixel data
            raise ImageRejected(UNREADABLE_DICOM, f"no decodable pixel data ({type(exc).__name__})") from None
    conversions = ["dicom"] + (["first_frame"] if frames > 1 else [])
    if pixels.dtype != np.uint8:
        conversions.append("16bit")
        pixels = _stretch_to_uint8(pixels)
    if pixels.ndim == 2:
        if dataset.get("PhotometricInterpretation") == "MONOCHROME1":
            pixels = 255 - pixels
        conversions.append("greyscale")
        pixels = _grey_to_rgb(pixels)
    tags = {name: str(getattr(dataset, name)) for name in DICOM_KEPT_TAGS if str(getattr(dataset, name, "") or "")}
    return Decoded(np.ascontiguousarray(pixels[..., :3]), (int(dataset.Columns), int(dataset.Rows)), 1.0,
                   conversions, tags)


def _read_dicom(data: bytes, max_pixels: int):
    """(the dataset with its pixel data still encoded, its number of frames), read only once its header has
    shown it within the limit. A deflated dataset is inflated in two bounded steps: the header, then as many
    bytes as the header declares."""
    import pydicom
    from pydicom.filereader import read_dataset
    from pydicom.uid import DeflatedExplicitVRLittleEndian

    try:
        # PS3.10 7.1: after the preamble and "DICM", (0002,0000) gives the length of the rest of the meta group.
        if data[132:138] != b"\x02\x00\x00\x00UL":
            raise ValueError("no file meta group length")
        start = 144 + int.from_bytes(data[140:144], "little")
        meta = pydicom.dcmread(io.BytesIO(data[:start])).file_meta
        if meta.get("TransferSyntaxUID") != DeflatedExplicitVRLittleEndian:
            frames, _ = _dicom_size(pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True), max_pixels)
            dataset = pydicom.dcmread(io.BytesIO(data))
            _check_first_frame(dataset, frames)
            return dataset, frames
        inflater = zlib.decompressobj(-zlib.MAX_WBITS)
        body = inflater.decompress(memoryview(data)[start:], DICOM_HEADER_BYTES)
        header = read_dataset(io.BytesIO(body), False, True, stop_when=lambda tag, *_: tag.group == 0x7FE0)
        frames, pixel_bytes = _dicom_size(header, max_pixels)
        body += inflater.decompress(inflater.unconsumed_tail, DICOM_HEADER_BYTES + pixel_bytes - len(body))
        if inflater.unconsumed_tail:
            raise ImageRejected(TOO_MANY_PIXELS, "its deflated data inflates to more than its header declares")
        dataset = read_dataset(io.BytesIO(body), False, True)
        dataset.file_meta = meta
        return dataset, frames
    except ImageRejected:
        raise
    except Exception as exc:  # pydicom raises many types on a damaged header, zlib on damaged deflate
        raise ImageRejected(UNREADABLE_DICOM, f"cannot parse DICOM ({type(exc).__name__})") from None


def _dicom_size(header, max_pixels: int) -> tuple[int, int]:
    """(frames, bytes of pixel data) from a DICOM header, refused when frames x rows x columns exceeds the limit
    (at most 3 samples per pixel, so the values stored never exceed an RGB image of ``max_pixels``)."""
    rows, columns = int(header.Rows), int(header.Columns)
    frames = int(header.get("NumberOfFrames") or 1)
    samples, bits = int(header.get("SamplesPerPixel") or 1), int(header.get("BitsAllocated") or 8)
    if min(rows, columns, frames, bits) < 1 or samples not in (1, 3):
        raise ImageRejected(UNREADABLE_DICOM, f"implausible image header ({frames} frame(s) of {columns}x{rows}, "
                                              f"{samples} sample(s) of {bits} bits)")
    _refuse_above(frames * rows * columns, max_pixels,
                  f"{frames} frame(s) of {columns}x{rows}" if frames > 1 else f"{columns}x{rows}")
    return frames, (frames * rows * columns * samples * bits + 7) // 8


def _check_first_frame(dataset, frames: int) -> None:
    """A compressed first frame must carry a JPEG or JPEG 2000 header no larger than the dataset's rows x
    columns, so that decoding it cannot allocate more than the limit allowed. Other compressions (RLE among
    them) decode to sizes no header states beforehand and are refused."""
    from pydicom.encaps import generate_frames

    syntax = dataset.file_meta.TransferSyntaxUID
    if not syntax.is_compressed:
        return
    frame = next(generate_frames(dataset.PixelData, number_of_frames=frames), b"")
    try:
        open_image(frame, int(dataset.Rows) * int(dataset.Columns))
    except ImageRejected as exc:
        reason = exc.reason if exc.reason == TOO_MANY_PIXELS else UNREADABLE_DICOM
        raise ImageRejected(reason, f"first frame ({syntax.name}): {exc.detail}") from None


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
