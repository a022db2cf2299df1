"""Hostile input (issue 20): every path confined to the folder the user named, decompression bombs refused from
their headers, pickles refused by what torch raises, and no command answering a bad file or option with a
traceback.

Each class of failure the red team found has its tests here, with variants (other compressions, nested links,
encoded path tricks), and property-based fuzz tests feed the image decoder and the manifest reader mutated real
files. The hostile files are built here; ../shared/data is used when present."""

from __future__ import annotations

import hashlib
import io
import json
import os
import pickle
import resource
import shutil
import struct
import subprocess
import sys
import tracemalloc
import zlib
from pathlib import Path

import click
import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pydicom
import pytest
import torch
import typer
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings, strategies as st
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset, write_file_meta_info
from pydicom.uid import DeflatedExplicitVRLittleEndian, JPEGBaseline8Bit, RLELossless, generate_uid

from retfm.cli.main import app, main
from retfm.data import Manifest
from retfm.data.config import IngestConfig
from retfm.data.datasets import ManifestDataset
from retfm.data.deid import generate_key
from retfm.data.ingest import ingest
from retfm.data.io import (EMPTY_FILE, NOT_AN_IMAGE, TOO_MANY_PIXELS, TRUNCATED, UNREADABLE_DICOM, UNREADABLE_FILE,
                           ImageRejected, decode_image)
from retfm.data.manifest import ManifestError
from retfm.data.paths import OUTSIDE_INPUT
from retfm.data.phantoms import generate_cohort
from retfm.data.shards import write_shards
from retfm.data.sources import list_source
from retfm.data.sources.imagefolder import HIDDEN_FILE
from retfm.data.sources.table import MISSING_FILE
from retfm.errors import RetfmError
from retfm.runs import load_checkpoint, load_own_checkpoint, read_json
from retfm.serve.app import create_app
from retfm.serve.config import ServeConfig
from retfm.share import bundle as share

from tests.conftest import SHARED_DATA, encode, fundus_rgb
from tests.test_cli import COMMANDS
from tests.test_io import _dicom_bytes
from tests.test_serve import AUTH, KEY, make_served_model

REASONS = {EMPTY_FILE, NOT_AN_IMAGE, TRUNCATED, TOO_MANY_PIXELS, UNREADABLE_DICOM}


def _rejected(data: bytes, **kwargs) -> ImageRejected:
    with pytest.raises(ImageRejected) as info:
        decode_image(data, **kwargs)
    return info.value


# ---- DICOMs built byte by byte -------------------------------------------------------------------------------------

def _dataset(rows: int, columns: int, frames: int = 1, samples: int = 1) -> Dataset:
    ds = Dataset()
    ds.SOPClassUID, ds.SOPInstanceUID = "1.2.840.10008.5.1.4.1.1.77.1.5.1", generate_uid()
    ds.Rows, ds.Columns, ds.NumberOfFrames, ds.SamplesPerPixel = rows, columns, frames, samples
    ds.PhotometricInterpretation = "MONOCHROME2" if samples == 1 else "RGB"
    if samples == 3:
        ds.PlanarConfiguration = 0
    ds.BitsAllocated = ds.BitsStored = 8
    ds.HighBit, ds.PixelRepresentation = 7, 0
    return ds


def _element(group: int, element: int, length: int) -> bytes:
    """An explicit-VR little-endian OB element header: what precedes ``length`` bytes of value."""
    return struct.pack("<HH2sHI", group, element, b"OB", 0, length)


def _part10(syntax: str, body: bytes) -> bytes:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = "1.2.840.10008.5.1.4.1.1.77.1.5.1", generate_uid()
    meta.TransferSyntaxUID = syntax
    out = DicomBytesIO()
    out.is_little_endian, out.is_implicit_VR = True, False
    out.write(b"\0" * 128 + b"DICM")
    write_file_meta_info(out, meta, enforce_standard=True)
    return out.getvalue() + body


def _deflated(dataset: Dataset, *pieces: bytes | int) -> bytes:
    """A Deflated Explicit VR Little Endian file: ``dataset`` (no pixel data), then ``pieces``: bytes, or a count
    of zero bytes deflated in 4 MiB steps, so that hundreds of megabytes cost nothing to build."""
    encoded = DicomBytesIO()
    encoded.is_little_endian, encoded.is_implicit_VR = True, False
    write_dataset(encoded, dataset)
    deflater = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    out = [deflater.compress(encoded.getvalue())]
    zeros = bytes(1 << 22)
    for piece in pieces:
        if isinstance(piece, bytes):
            out.append(deflater.compress(piece))
            continue
        for start in range(0, piece, len(zeros)):
            out.append(deflater.compress(zeros[:min(len(zeros), piece - start)]))
    return _part10(DeflatedExplicitVRLittleEndian, b"".join(out) + deflater.flush())


def _deflated_bomb() -> bytes:
    """The red team's file: 20 frames of 4000 x 4000, deflated to about 311 KB."""
    count = 20 * 4000 * 4000
    return _deflated(_dataset(4000, 4000, frames=20), _element(0x7FE0, 0x0010, count), count)


def _encapsulated(frame: bytes, rows: int, columns: int, syntax: str, samples: int = 1) -> bytes:
    ds = _dataset(rows, columns, samples=samples)
    del ds.NumberOfFrames
    if samples == 3:
        ds.PhotometricInterpretation = "YBR_FULL_422"
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID, ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPClassUID, ds.SOPInstanceUID
    ds.file_meta.TransferSyntaxUID = syntax
    ds.PixelData = encapsulate([frame])
    ds["PixelData"].VR = "OB"
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


# ---- 1. decompression bombs are refused from their headers ---------------------------------------------------------

def test_the_red_teams_deflated_dicom_is_refused_from_its_header():
    bomb = _deflated_bomb()
    assert len(bomb) < 400_000
    for limit in (64_000_000, ServeConfig.model_fields["max_pixels"].default):  # ingest's and the service's
        refused = _rejected(bomb, max_pixels=limit)
        assert refused.reason == TOO_MANY_PIXELS and "20 frame(s) of 4000x4000" in refused.detail


def test_every_frame_counts_and_only_the_first_is_decoded():
    frames = np.stack([np.full((64, 48), 40 * (i + 1), np.uint8) for i in range(3)])
    data = _dicom_bytes(frames.reshape(3 * 64, 48))  # then re-headed as 3 frames of 64 x 48
    ds = pydicom.dcmread(io.BytesIO(data))
    ds.Rows, ds.NumberOfFrames = 64, 3
    buffer = io.BytesIO()
    ds.save_as(buffer)
    assert _rejected(buffer.getvalue(), max_pixels=3 * 64 * 48 - 1).reason == TOO_MANY_PIXELS
    decoded = decode_image(buffer.getvalue(), max_pixels=3 * 64 * 48)
    assert decoded.rgb.shape == (64, 48, 3) and (decoded.rgb == 40).all()
    assert "first_frame" in decoded.conversions


def test_deflated_data_inflates_only_as_far_as_its_header_declares():
    grey = fundus_rgb(64)[..., 1]
    pixels = _element(0x7FE0, 0x0010, grey.size) + grey.tobytes()
    decoded = decode_image(_deflated(_dataset(64, 64), pixels))
    np.testing.assert_array_equal(decoded.rgb[..., 0], grey)
    # 40 MB of zeros after the declared pixels, in an element the header never mentions
    trailing = _deflated(_dataset(64, 64), pixels, _element(0x7FE1, 0x0010, 40 << 20), 40 << 20)
    assert len(trailing) < 100_000
    assert _rejected(trailing).reason == TOO_MANY_PIXELS
    # 40 MB of zeros in a private element before the header is complete
    ahead = _deflated(Dataset(), _element(0x0009, 0x1010, 40 << 20), 40 << 20)
    assert _rejected(ahead).reason == UNREADABLE_DICOM


def test_a_compressed_frame_is_held_to_its_dataset_header():
    jpeg = encode(fundus_rgb(96, width=128), "JPEG")
    decoded = decode_image(_encapsulated(jpeg, 96, 128, JPEGBaseline8Bit, samples=3))
    assert decoded.rgb.shape == (96, 128, 3) and decoded.rgb[48, 64, 0] > decoded.rgb[48, 64, 2] + 50
    liar = encode(np.zeros((3000, 3000), np.uint8), "JPEG")  # a small dataset whose JPEG frame says 3000 x 3000
    assert _rejected(_encapsulated(liar, 96, 128, JPEGBaseline8Bit)).reason == TOO_MANY_PIXELS
    rle = _rejected(_encapsulated(b"\0" * 64, 96, 128, RLELossless))  # no header states its decoded size
    assert rle.reason == UNREADABLE_DICOM and "RLE Lossless" in rle.detail


def test_a_ybr_dicom_is_converted_to_rgb_once():
    from pydicom.pixels import convert_color_space

    rgb = fundus_rgb(32)
    data = _dicom_bytes(convert_color_space(rgb, "RGB", "YBR_FULL"))
    ds = pydicom.dcmread(io.BytesIO(data))
    ds.PhotometricInterpretation = "YBR_FULL"
    buffer = io.BytesIO()
    ds.save_as(buffer)
    assert np.abs(decode_image(buffer.getvalue()).rgb.astype(int) - rgb).max() <= 2


@pytest.mark.parametrize("fmt, options", [("PNG", {}), ("TIFF", {"compression": "tiff_lzw"}),
                                          ("TIFF", {"compression": "tiff_adobe_deflate"}), ("GIF", {}),
                                          ("JPEG", {}), ("WEBP", {"lossless": True}), ("BMP", {})])
def test_bombs_in_other_formats_are_refused_from_their_headers(fmt, options):
    data = encode(Image.new("L", (2000, 1000)), fmt, **options)
    refused = _rejected(data, max_pixels=1_000_000)
    assert refused.reason == TOO_MANY_PIXELS and "2000x1000" in refused.detail


def test_ingest_refuses_a_file_larger_than_any_image_within_the_limit(tmp_path):
    from retfm.data.io import largest_file

    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "huge.png").write_bytes(encode(fundus_rgb(64), "PNG") + bytes(largest_file(100 * 100)))
    (tmp_path / "src" / "fine.png").write_bytes(encode(fundus_rgb(64), "PNG"))
    report = ingest(tmp_path / "src", tmp_path / "out", IngestConfig(size=32, workers=1, max_pixels=100 * 100))
    assert report["ingested"] == 1 and report["rejected"] == {TOO_MANY_PIXELS: 1}


_PEAK_RSS = """
import resource, sys
from retfm.data.io import ImageRejected, decode_image
data = open(sys.argv[1], "rb").read()
try:
    decode_image(data, min_side=512)
except ImageRejected:
    pass
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
"""


def test_a_dicom_bomb_costs_less_memory_than_a_photo(tmp_path):
    """Peak resident memory of decoding, each in a fresh process: the bomb (refused) against a photograph."""
    photo = SHARED_DATA / "retina_cc0.jpg"
    if not photo.exists():
        photo = tmp_path / "photo.jpg"
        photo.write_bytes(encode(fundus_rgb(1400), "JPEG"))
    (tmp_path / "bomb.dcm").write_bytes(_deflated_bomb())
    peaks = {}
    for name, path in (("photo", photo), ("bomb", tmp_path / "bomb.dcm")):
        run = subprocess.run([sys.executable, "-c", _PEAK_RSS, str(path)], capture_output=True, text=True, check=True)
        peaks[name] = int(run.stdout.split()[-1])
    assert peaks["bomb"] < 2 * peaks["photo"], peaks


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    model, _ = make_served_model(tmp_path_factory.mktemp("serve"))
    return ServeConfig(model=model, api_key=KEY)


def test_the_service_refuses_the_dicom_bomb(served):
    with TestClient(create_app(served)) as client:
        answer = client.post("/v1/predict", content=_deflated_bomb(), headers=AUTH)
        assert answer.status_code == 413 and "20 frame(s) of 4000x4000" in answer.json()["detail"]
        assert client.post("/v1/predict", content=encode(fundus_rgb(128)), headers=AUTH).status_code == 200


# ---- 2. and 3. paths: only files inside the folder the user named are opened ---------------------------------------

def _outside_world(tmp_path: Path) -> tuple[Path, Path]:
    """``tmp_path/in`` (the input) and ``tmp_path/outside/secret.jpg`` (an ingestible image it must not reach)."""
    (tmp_path / "in").mkdir()
    (tmp_path / "outside").mkdir()
    secret = tmp_path / "outside" / "secret.jpg"
    secret.write_bytes(encode(fundus_rgb(96, seed=7)))
    return tmp_path / "in", secret


def _reconciles(report: dict) -> bool:
    return report["seen"] == report["ingested"] + report["duplicates"] + sum(report["rejected"].values())


def test_csv_rows_that_lead_outside_the_input_are_refused_unopened(tmp_path):
    root, secret = _outside_world(tmp_path)
    (root / "images").mkdir()
    (root / "images" / "a.jpg").write_bytes(encode(fundus_rgb(96)))
    (root / "images" / "link.jpg").symlink_to(secret)
    (root / "images" / "chain.jpg").symlink_to("link.jpg")  # a link to a link that leads out
    (root / "images" / "loop1.jpg").symlink_to("loop2.jpg")
    (root / "images" / "loop2.jpg").symlink_to("loop1.jpg")
    outside = ["../outside/secret.jpg", str(secret), "images/../../outside/secret.jpg", "images/link.jpg",
               "images/chain.jpg", "images/loop1.jpg"]
    missing = ["%2e%2e/outside/secret.jpg", "..\\outside\\secret.jpg"]  # encodings are names, never decoded
    paths = ["images/a.jpg", *outside, *missing, str(root / "images" / "a.jpg")]  # the last: inside, absolute
    pd.DataFrame({"path": paths, "grade": range(len(paths))}).to_csv(root / "labels.csv", index=False)

    listed = {item.source: item for item in list_source(root, "auto", IngestConfig()).items}
    assert all(listed[p].rejected == OUTSIDE_INPUT and listed[p].file is None for p in outside)
    report = ingest(root, tmp_path / "out", IngestConfig(size=32, workers=1))
    assert report["rejected"] == {OUTSIDE_INPUT: len(outside), MISSING_FILE: len(missing)}
    assert report["ingested"] == 1 and report["duplicates"] == 1 and _reconciles(report)
    assert {e["source"] for e in report["rejected_files"] if e["reason"] == OUTSIDE_INPUT} == set(outside)


def test_an_image_folder_follows_no_link_out_and_counts_hidden_files(tmp_path, monkeypatch):
    root, secret = _outside_world(tmp_path)
    (root / "healthy").mkdir()
    (root / "healthy" / "a.jpg").write_bytes(encode(fundus_rgb(96)))
    (root / "healthy" / "same.jpg").symlink_to("a.jpg")  # inside: followed, a duplicate
    (root / "healthy" / "out.jpg").symlink_to(secret)
    (root / "sick").symlink_to(secret.parent, target_is_directory=True)  # a folder link out: nested files unseen
    (root / "healthy" / "..sneaky.jpg").write_bytes(encode(fundus_rgb(96, seed=3)))
    (root / ".DS_Store").write_bytes(b"\0\0\0\1Bud1")
    (root / "healthy" / "gone.jpg").symlink_to("nowhere.jpg")
    monkeypatch.chdir(tmp_path)  # the folder named as the user typed it: relative
    report = ingest(Path("in"), tmp_path / "out", IngestConfig(size=32, workers=1))
    assert report["seen"] == 7 and report["ingested"] == 1 and report["duplicates"] == 1 and _reconciles(report)
    assert report["rejected"] == {HIDDEN_FILE: 2, OUTSIDE_INPUT: 2, UNREADABLE_FILE: 1}
    assert {e["source"] for e in report["rejected_files"] if e["reason"] == OUTSIDE_INPUT} == {"healthy/out.jpg",
                                                                                              "sick"}


def test_public_layouts_follow_the_same_rule(tmp_path, monkeypatch):
    root, secret = _outside_world(tmp_path)
    monkeypatch.chdir(tmp_path)
    root = Path("in")
    (root / "train_images").mkdir()
    (root / "train_images" / "aaa.png").write_bytes(encode(fundus_rgb(96), "PNG"))
    (root / "train_images" / "bbb.png").symlink_to(secret)
    (tmp_path / "outside" / "train.csv").write_text("id_code,diagnosis\naaa,0\nbbb,2\n")
    (root / "train.csv").symlink_to(tmp_path / "outside" / "train.csv")
    with pytest.raises(RetfmError, match=f"train.csv: {OUTSIDE_INPUT}"):
        list_source(root, "aptos2019", IngestConfig())
    (root / "train.csv").unlink()
    shutil.copy(tmp_path / "outside" / "train.csv", root / "train.csv")
    report = ingest(root, tmp_path / "out", IngestConfig(format="aptos2019", size=32, workers=1))
    assert report["ingested"] == 1 and report["rejected"] == {OUTSIDE_INPUT: 1} and _reconciles(report)


@pytest.fixture
def cohort(tmp_path):
    """A de-identified ingest of 6 phantoms, and an image outside it."""
    generate_cohort(tmp_path / "raw", sites=1, per_site=6, size=64, seed=0)
    ingest(tmp_path / "raw", tmp_path / "ds", IngestConfig(size=32, workers=1,
                                                           deid_key_file=generate_key(tmp_path / "deid.key")))
    (tmp_path / "elsewhere.png").write_bytes(encode(fundus_rgb(32), "PNG"))
    return tmp_path


def test_manifest_readers_refuse_images_that_lead_outside(cohort):
    manifest = Manifest.read(cohort / "ds")
    victim = manifest.root / str(manifest.table["path"].iloc[0])
    victim.unlink()
    victim.symlink_to(cohort / "elsewhere.png")
    with pytest.raises(ManifestError, match=OUTSIDE_INPUT):
        manifest.image_path(0)
    with pytest.raises(ManifestError, match=OUTSIDE_INPUT):
        manifest.validate(check_files=True)
    with pytest.raises(RetfmError, match=OUTSIDE_INPUT):
        ManifestDataset(manifest)[0]
    with pytest.raises(RetfmError, match=OUTSIDE_INPUT):
        write_shards(cohort / "ds", cohort / "shards")


def test_share_pack_refuses_links_and_unpack_refuses_images_that_do_not_decode(cohort):
    for name, role in (("coordinator", "coordinator"), ("site", "site")):
        share.generate_keys(cohort / name, role)
    manifest = Manifest.read(cohort / "ds")
    victim = manifest.root / str(manifest.table["path"].iloc[0])
    original = victim.read_bytes()
    victim.unlink()
    victim.symlink_to(manifest.root / str(manifest.table["path"].iloc[1]))  # even a link inside the folder
    with pytest.raises(RetfmError, match="refused: a link"):
        share.pack(cohort / "ds", cohort / "coordinator.pub", cohort / "site.key", cohort / "x.bundle")
    for content in (original[:len(original) // 3], _dicom_bytes(fundus_rgb(32), PatientName="Doe^Jane")):
        victim.unlink()
        victim.write_bytes(content)  # a truncated PNG, then a DICOM (with its tags) named .png
        share.pack(cohort / "ds", cohort / "coordinator.pub", cohort / "site.key", cohort / "x.bundle")
        with pytest.raises(RetfmError, match=f"refused: {victim.parent.name}/{victim.name} is not a readable image"):
            share.unpack(cohort / "x.bundle", cohort / "coordinator.key", [cohort / "site.pub"], cohort / "got")
        assert not (cohort / "got").exists()


# ---- 5. checkpoints: refused in one line, by the exception torch raises ------------------------------------------

class _RunsCode:
    """Unpickled, it creates ``marker``: proof that code ran."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


@pytest.mark.parametrize("variant, match", [
    ("malicious zip", r"refused: an unsafe pickle \(it calls io.open\)"),
    ("malicious legacy pickle", "refused it as an unsafe or damaged pickle"),
    ("truncated", r"damaged or truncated \(RuntimeError\)"),
    ("empty", r"damaged or truncated \(EOFError\)"),
    ("not a dict", "not a retfm run checkpoint"),
])
def test_checkpoints_are_refused_in_one_line(tmp_path, variant, match):
    path, marker = tmp_path / "checkpoint.pt", tmp_path / "marker"
    if variant == "malicious zip":
        torch.save({"config": "{}", "model": _RunsCode(marker)}, path)
    elif variant == "malicious legacy pickle":
        path.write_bytes(pickle.dumps(_RunsCode(marker)))
    elif variant == "truncated":
        torch.save({"config": "{}", "model": {"w": torch.zeros(64)}}, path)
        path.write_bytes(path.read_bytes()[:300])
    elif variant == "empty":
        path.write_bytes(b"")
    else:
        torch.save([torch.zeros(2)], path)
    with pytest.raises(RetfmError, match=match) as refused:
        load_own_checkpoint(path, IngestConfig())
    message = str(refused.value)
    assert message.startswith(str(path)) and "\n" not in message and "weights_only=False" not in message
    assert not marker.exists()


def test_unsafe_pickles_are_told_by_exception_type_not_message(tmp_path, monkeypatch):
    def refuse(*args, **kwargs):
        raise pickle.UnpicklingError("a future torch's wording")
    monkeypatch.setattr(torch, "load", refuse)
    with pytest.raises(RetfmError, match="refused it as an unsafe or damaged pickle"):
        load_checkpoint(tmp_path / "any.pt")


def test_damaged_json_a_run_wrote_is_refused_in_one_line(tmp_path):
    path = tmp_path / "metrics.json"
    for content in (b'{"n": 3, "metrics": {', b"\xff\xfe{}"):  # cut short by a crash; overwritten with junk
        path.write_bytes(content)
        with pytest.raises(RetfmError, match=r"metrics.json: not readable JSON, damaged or truncated"):
            read_json(path)


# ---- 5. no command answers a bad file or option with a traceback -------------------------------------------------

TAG = "x=!!python/object/apply:os.system ['echo PWNED']"


@pytest.fixture(scope="module")
def bad(tmp_path_factory):
    """Hostile and damaged files of every kind a command reads, and a small valid ingest for the deeper ones."""
    root = tmp_path_factory.mktemp("bad")
    generate_cohort(root / "raw", sites=2, per_site=16, size=64, seed=0)
    ingest(root / "raw", root / "ds", IngestConfig(size=32, workers=1))
    rng = np.random.default_rng(0)
    (root / "garbage").write_bytes(rng.bytes(3000))
    (root / "tag.yaml").write_text("x: !!python/object/apply:os.system ['echo PWNED']\n")
    (root / "binary.yaml").write_bytes(b"\xff\xfe" + rng.bytes(500))
    for name in ("manifest", "generator", "run", "index"):
        (root / name).mkdir()
    (root / "manifest" / "manifest.parquet").write_bytes(rng.bytes(3000))
    (root / "generator" / "generator.json").write_bytes(rng.bytes(300))
    torch.save(_RunsCode(root / "marker"), root / "run" / "checkpoint.pt")
    index = root / "index"
    (index / "index.faiss").write_bytes(rng.bytes(3000))
    (index / "items.parquet").write_bytes(rng.bytes(3000))
    hashes = {name: hashlib.sha256((index / name).read_bytes()).hexdigest()
              for name in ("index.faiss", "items.parquet")}
    (index / "index.json").write_text(json.dumps({"format": "retfm-retrieval-index/1", "files": hashes,
                                                  "count": 3, "dim": 4, "kind": "exact"}))
    yield root
    assert not (root / "marker").exists()  # no hostile pickle ever ran


def _bad_invocations(b: Path) -> dict[tuple[str, ...], list[list]]:
    """Per command (a path in the CLI), the bad inputs it is given: damaged or hostile files, a YAML tag in
    --set, an --out that is a file. ``models list`` takes no input and is not here."""
    resume = ["--out", b / "run", "--resume"]
    return {
        ("evaluate",): [["--predictions", b / "garbage", "--label", "x", "--out", b / "o"]],
        ("embed",): [["--data", b / "ds", "--model", "tiny-vit", "--weights", b / "run" / "checkpoint.pt",
                      "--out", b / "o.parquet"], ["--data", b / "ds", "--out", b / "o.parquet", "--set", TAG]],
        ("probe",): [["--embeddings", b / "garbage", "--label", "x", "--out", b / "o"]],
        ("pretrain",): [["--objective", "mae", "--data", b / "ds", "--model", "tiny-vit", *resume],
                        ["--out", b / "o", "--config", b / "binary.yaml"]],
        ("finetune",): [["--data", b / "ds", "--model", "tiny-vit", "--weights", "random", "--label", "glaucoma",
                         *resume], ["--out", b / "o", "--config", b / "tag.yaml"]],
        ("zeroshot",): [["--data", b / "ds", "--model", b / "generator", "--label", "x", "--out", b / "o"]],
        ("study",): [[b / "binary.yaml"]],
        ("retrieve",): [["--index", b / "index", "--embeddings", b / "garbage"]],
        ("serve",): [["--model", b / "garbage"], ["--set", TAG]],
        ("demo",): [["--data", b / "manifest", "--out", b / "o"]],
        ("data", "ingest"): [[b / "garbage", "--out", b / "o", "--format", "retinamnist"],
                             [b / "raw", "--out", b / "garbage"], [b / "raw", "--out", b / "o", "--set", TAG]],
        ("data", "phantoms"): [["--out", b / "garbage"]],
        ("data", "stats"): [[b / "manifest"]],
        ("data", "keygen"): [[b / "garbage" / "site.key"]],
        ("data", "deid"): [[b / "manifest", "--key-file", b / "garbage", "--out", b / "o"]],
        ("data", "shard"): [[b / "garbage", "--out", b / "o"]],
        ("models", "show"): [[b / "garbage"]],
        ("knowledge", "list"): [["--knowledge", b / "binary.yaml"]],
        ("knowledge", "show"): [["glaucoma", "--knowledge", b / "tag.yaml"]],
        ("federated", "run"): [[b / "binary.yaml", "--out", b / "o"], [b / "tag.yaml", "--out", b / "o"]],
        ("federated", "certs"): [["--out", b / "garbage", "--host", "localhost"]],
        ("federated", "app"): [[b / "garbage", "--out", b / "o", "--sites", "2", "--run-folder", b / "run"]],
        ("federated", "site-config"): [["--superlink", "localhost:9092", "--site", "s", "--data", b / "ds",
                                        "--ca", b / "garbage", "--key", b / "garbage"]],
        ("share", "keygen"): [["--out", b / "garbage" / "site", "--role", "site"]],
        ("share", "pack"): [[b / "manifest", "--to", b / "garbage", "--sign", b / "garbage", "--out", b / "o"]],
        ("share", "unpack"): [[b / "garbage", "--key", b / "garbage", "--trust", b / "garbage", "--out", b / "o"]],
        ("index", "build"): [["--embeddings", b / "garbage", "--out", b / "o"]],
        ("synth", "train"): [["--data", b / "ds", "--label", "glaucoma", "--size", "16", *resume]],
        ("synth", "sample"): [["--generator", b / "generator", "--n", "2", "--out", b / "o"]],
        ("synth", "audit"): [["--generator", b / "generator", "--real", b / "ds", "--synthetic", b / "ds",
                              "--out", b / "o"]],
        ("synth", "export"): [["--generator", b / "generator", "--out", b / "o"]],
        ("synth", "assemble"): [["--generator", b / "generator", "--n", "2", "--out", b / "o"]],
    }


LEAVES = [path for path in COMMANDS
          if not isinstance(typer.main.get_command(app).commands[path[0]], click.Group) or len(path) > 1]


def test_every_command_has_bad_inputs_to_answer(tmp_path):
    assert set(_bad_invocations(tmp_path)) == set(LEAVES) - {("models", "list")}


def _run_cli(args: list, capsys) -> tuple[int, str]:
    argv = sys.argv
    sys.argv = ["retfm", *map(str, args)]
    try:
        main()
        code = 0
    except SystemExit as exit_:
        code = exit_.code
    finally:
        sys.argv = argv
    return code, capsys.readouterr().err


@pytest.mark.parametrize("command", sorted(set(LEAVES) - {("models", "list")}), ids=" ".join)
def test_no_command_answers_bad_input_with_a_traceback(bad, command, capsys):
    for args in _bad_invocations(bad)[command]:
        code, err = _run_cli([*command, *args], capsys)
        errors = [line for line in err.splitlines() if line.startswith("error:")]
        assert code == 2 and len(errors) == 1 and "Traceback" not in err, (args, code, err)


def test_zeroshot_with_a_damaged_clip_card_is_one_line(bad, capsys):
    (bad / "clip").mkdir(exist_ok=True)
    (bad / "clip" / "clip.json").write_bytes(b"\xff" * 40)
    code, err = _run_cli(["zeroshot", "--data", bad / "ds", "--model", bad / "clip", "--label", "glaucoma",
                          "--out", bad / "o"], capsys)
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert code == 2 and len(errors) == 1 and "clip.json: not readable JSON" in errors[0] and "Traceback" not in err


# ---- fuzz: mutated real files give a result or a named rejection, within a memory bound ----------------------

def _samples() -> list[bytes]:
    rgb = fundus_rgb(96)
    samples = [encode(rgb, "JPEG"), encode(rgb, "PNG"), encode(rgb, "TIFF", compression="tiff_lzw"),
               _dicom_bytes(rgb, PatientID="P1"),
               _deflated(_dataset(96, 96), _element(0x7FE0, 0x0010, 96 * 96) + rgb[..., 0].tobytes())]
    real = SHARED_DATA / "mexfundus" / "images"
    if real.is_dir():
        samples += [path.read_bytes() for path in sorted(real.glob("*.jpg"))[:2]]
    return samples


SAMPLES = _samples()
_MUTATION = st.tuples(st.integers(0, 2), st.integers(0, 1 << 30), st.binary(min_size=1, max_size=8))


def _mutated(data: bytes, mutations) -> bytes:
    """Each mutation overwrites, inserts or cuts at a position (modulo the length)."""
    data = bytearray(data)
    for kind, where, payload in mutations:
        where %= max(1, len(data))
        if kind == 0:
            data[where:where + len(payload)] = payload
        elif kind == 1:
            data[where:where] = payload
        else:
            del data[where:]
    return bytes(data)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(sample=st.sampled_from(range(len(SAMPLES))), mutations=st.lists(_MUTATION, min_size=1, max_size=4))
def test_fuzzed_images_decode_or_are_refused_by_name(sample, mutations):
    data = _mutated(SAMPLES[sample], mutations)
    tracemalloc.start()
    try:
        decoded = decode_image(data, min_side=64, max_pixels=1_000_000)
        assert decoded.rgb.dtype == np.uint8 and decoded.rgb.ndim == 3 and decoded.rgb.shape[2] == 3
    except ImageRejected as exc:
        assert exc.reason in REASONS
    finally:
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    assert peak < 64 << 20


@pytest.fixture(scope="module")
def manifest_files(tmp_path_factory):
    root = tmp_path_factory.mktemp("manifest")
    table = pd.DataFrame({"image_id": [f"i{n}" for n in range(6)], "path": [f"images/i{n}.png" for n in range(6)],
                          "site": ["a", "b"] * 3, "split": ["train", "val", "test"] * 2, "age": [40.0] * 6,
                          "dr_grade": [0, 1, 2, 0, 1, 2]})
    Manifest(table, root).write(root / "manifest.parquet")
    table.to_csv(root / "manifest.csv", index=False)
    return {suffix: (root / f"manifest{suffix}").read_bytes() for suffix in (".parquet", ".csv")}


def test_a_manifest_with_damaged_pandas_metadata_fails_in_one_line(manifest_files, tmp_path):
    # found by the fuzzer below: one byte of the pandas metadata changed, pyarrow raised a KeyError
    source, path = tmp_path / "source.parquet", tmp_path / "manifest.parquet"
    source.write_bytes(manifest_files[".parquet"])
    table = pq.read_table(source)
    pandas = json.loads(table.schema.metadata[b"pandas"])
    del pandas["columns"][0]["numpy_type"]
    pq.write_table(table.replace_schema_metadata({**table.schema.metadata, b"pandas": json.dumps(pandas)}), path)
    with pytest.raises(RetfmError, match="damaged pandas metadata") as caught:
        Manifest.read(path)
    assert str(path) in str(caught.value) and "\n" not in str(caught.value)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(suffix=st.sampled_from([".parquet", ".csv"]), mutations=st.lists(_MUTATION, min_size=1, max_size=4))
def test_fuzzed_manifests_read_or_fail_in_one_line(manifest_files, tmp_path, suffix, mutations):
    path = tmp_path / f"fuzzed{suffix}"
    path.write_bytes(_mutated(manifest_files[suffix], mutations))
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    try:
        assert len(Manifest.read(path)) >= 0
    except RetfmError as exc:
        assert str(path) in str(exc) and "\n" not in str(exc)
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 256 << 10  # KiB: under 256 MiB more
    os.remove(path)
