import io

import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.dataset import FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from retfm.data.io import (EMPTY_FILE, NOT_AN_IMAGE, TOO_MANY_PIXELS, TRUNCATED, UNREADABLE_DICOM, ImageRejected,
                           decode_image)
from tests.conftest import encode, fundus_rgb


def _rejected(data: bytes, **kwargs) -> str:
    with pytest.raises(ImageRejected) as info:
        decode_image(data, **kwargs)
    return info.value.reason


def test_bad_files_are_rejected_with_named_reasons():
    jpeg = encode(fundus_rgb(128))
    png = encode(fundus_rgb(128), "PNG")
    assert _rejected(b"") == EMPTY_FILE
    assert _rejected(b"patient notes, not a picture\n" * 10) == NOT_AN_IMAGE
    assert _rejected(jpeg[: len(jpeg) // 2]) == TRUNCATED
    assert _rejected(png[: len(png) // 2]) == TRUNCATED
    assert _rejected(jpeg, max_pixels=128 * 100) == TOO_MANY_PIXELS
    assert _rejected(b"\0" * 128 + b"DICM" + b"\x02\x00garbage") == UNREADABLE_DICOM


def test_pillow_decompression_bomb_is_refused_before_decoding():
    # A 1-bit PNG that claims 15000 x 15000 pixels but weighs a few kilobytes.
    bomb = io.BytesIO()
    Image.new("1", (15000, 15000)).save(bomb, format="PNG")
    assert len(bomb.getvalue()) < 100_000
    assert _rejected(bomb.getvalue()) == TOO_MANY_PIXELS


@pytest.mark.parametrize("mode, conversion", [("CMYK", "cmyk"), ("L", "greyscale"), ("P", "palette"),
                                              ("RGBA", "alpha"), ("I;16", "16bit")])
def test_other_modes_become_rgb_uint8(mode, conversion):
    rgb = fundus_rgb(96)
    if mode == "I;16":
        image = Image.fromarray(rgb[..., 0].astype(np.uint16) * 16)  # 12-bit data in a 16-bit container
        data = encode(np.asarray(image), "PNG")
    elif mode == "CMYK":
        data = encode(Image.fromarray(rgb).convert("CMYK"), "JPEG")
    else:
        data = encode(Image.fromarray(rgb).convert(mode), "PNG")
    decoded = decode_image(data)
    assert decoded.rgb.dtype == np.uint8 and decoded.rgb.shape == (96, 96, 3)
    assert conversion in decoded.conversions
    # The picture survives: the bright disc stays bright and the surround stays dark.
    assert decoded.rgb[48, 48].max() > 60 and decoded.rgb[2, 2].max() < 20


def test_exif_orientation_is_applied():
    rgb = np.zeros((40, 60, 3), np.uint8)
    rgb[:10, :10] = 255  # marker in the stored image's top-left corner
    exif = Image.Exif()
    exif[0x0112] = 6  # stored rotated: display needs a 90 degree clockwise turn
    data = encode(rgb, "JPEG", exif=exif.tobytes(), quality=95)
    decoded = decode_image(data)
    assert decoded.rgb.shape == (60, 40, 3) and decoded.source_size == (40, 60)
    assert "exif_rotated" in decoded.conversions
    assert decoded.rgb[:10, -10:].mean() > 200 and decoded.rgb[:10, :10].mean() < 50  # now top-right


def test_large_jpeg_uses_draft_decoding():
    data = encode(fundus_rgb(2000), quality=90)
    decoded = decode_image(data, min_side=500)
    assert decoded.source_size == (2000, 2000)
    assert decoded.rgb.shape == (500, 500, 3) and decoded.scale == pytest.approx(0.25)
    # DCT scaling only goes down in powers of two and never below what was asked for.
    assert decode_image(data, min_side=512).rgb.shape == (1000, 1000, 3)
    assert decode_image(data, min_side=1500).rgb.shape == (2000, 2000, 3)


def _dicom_bytes(pixels: np.ndarray, **tags) -> bytes:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.77.1.5.1"  # ophthalmic photography 8 bit
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = pydicom.Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    for key, value in tags.items():
        setattr(ds, key, value)
    ds.Rows, ds.Columns = pixels.shape[:2]
    ds.SamplesPerPixel = 3 if pixels.ndim == 3 else 1
    ds.PhotometricInterpretation = "RGB" if pixels.ndim == 3 else "MONOCHROME2"
    if pixels.ndim == 3:
        ds.PlanarConfiguration = 0
    ds.BitsAllocated = ds.BitsStored = 8 * pixels.dtype.itemsize
    ds.HighBit = ds.BitsStored - 1
    ds.PixelRepresentation = 0
    ds.PixelData = pixels.tobytes()
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def test_dicom_pixels_and_kept_tags():
    rgb = fundus_rgb(64)
    data = _dicom_bytes(rgb, PatientName="Doe^Jane", PatientID="MRN-1234", PatientSex="F",
                        PatientBirthDate="19500102", StudyDate="20200101", ImageLaterality="L", Modality="OP")
    decoded = decode_image(data)
    np.testing.assert_array_equal(decoded.rgb, rgb)
    assert decoded.dicom["PatientID"] == "MRN-1234" and decoded.dicom["ImageLaterality"] == "L"
    assert "PatientName" not in decoded.dicom
    grey16 = decode_image(_dicom_bytes((rgb[..., 0].astype(np.uint16) * 200)))
    assert {"16bit", "greyscale"} <= set(grey16.conversions) and grey16.rgb.max() == 255


def test_dicom_without_pixels_is_rejected():
    data = _dicom_bytes(fundus_rgb(32))
    ds = pydicom.dcmread(io.BytesIO(data))
    del ds.PixelData
    buffer = io.BytesIO()
    ds.save_as(buffer)
    assert _rejected(buffer.getvalue()) == UNREADABLE_DICOM
