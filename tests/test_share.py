"""``retfm share``: a de-identified ingest travels encrypted and signed; every damaged or misdirected bundle is
refused with one line, and the output folder stays untouched."""

import hashlib
import io
import shutil
import subprocess
import sys
import tarfile

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from typer.testing import CliRunner

from retfm.cli.main import app
from retfm.data import Manifest
from retfm.data.config import IngestConfig
from retfm.data.deid import generate_key
from retfm.data.ingest import ingest
from retfm.data.phantoms import generate_cohort
from retfm.errors import RetfmError
from retfm.share import bundle as share

CHUNK = 4096  # small chunks, so the tiny ingest spans many of them


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """8 phantom images from 2 sites ingested with a de-identification key, coordinator keys A and B, a trusted
    and an untrusted site key, and one bundle for A signed by the trusted site."""
    root = tmp_path_factory.mktemp("share")
    generate_cohort(root / "raw", sites=2, per_site=4, size=96, seed=0)
    ingest(root / "raw", root / "ds", IngestConfig(size=64, workers=1, deid_key_file=generate_key(root / "deid.key")))
    for name, role in (("a", "coordinator"), ("b", "coordinator"), ("site", "site"), ("stranger", "site")):
        share.generate_keys(root / name, role)
    share.pack(root / "ds", root / "a.pub", root / "site.key", root / "ds.bundle", chunk_size=CHUNK)
    return root


def _unpack(world, bundle, out, key="a.key", trusted=("site.pub",)):
    return share.unpack(bundle, world / key, [world / t for t in trusted], out)


def _refused(world, bundle, tmp_path, match, **keys):
    out = tmp_path / "out"
    with pytest.raises(RetfmError, match=match) as error:
        _unpack(world, bundle, out, **keys)
    message = str(error.value)
    assert str(bundle) in message and "\n" not in message
    assert not out.exists() and list(tmp_path.glob(".out.*")) == []  # no output, no staging folder left behind


def _write_changed(world, tmp_path, change):
    data = bytearray((world / "ds.bundle").read_bytes())
    change(data)
    path = tmp_path / "changed.bundle"
    path.write_bytes(bytes(data))
    return path


def _layout(data: bytes) -> tuple[int, int]:
    """(offset of the ciphertext length field, offset of the ciphertext)."""
    start = len(share.MAGIC) + 1
    header_end = start + 4 + int.from_bytes(data[start:start + 4], "big")
    return header_end, header_end + 8 + share.SIGNATURE_BYTES


def _resigned(world, ciphertext: bytes, original: bytes) -> bytes:
    """The bundle with new ciphertext, signed again by the trusted site: what a faulty or malicious trusted
    sender could produce. Only the chunks' own authentication can catch it."""
    length_at, _ = _layout(original)
    prefix = original[:length_at]
    signer = share.load_key(world / "site.key", Ed25519PrivateKey)
    statement = share._signed_statement(prefix, len(ciphertext), hashlib.sha256(ciphertext).digest())
    return prefix + len(ciphertext).to_bytes(8, "big") + signer.sign(statement) + ciphertext


def test_round_trip_gives_the_same_files_and_a_usable_ingest(world, tmp_path):
    out = tmp_path / "received"
    summary = _unpack(world, world / "ds.bundle", out)
    sent = Manifest.read(world / "ds")
    received = Manifest.read(out)
    received.validate(check_files=True)
    assert summary["images"] == len(received) == len(sent) == 8
    assert received.metadata["retfm.deidentified"] == "true"
    names = ["manifest.parquet", "deid_report.json", *sent.table["path"]]
    for name in names:
        assert (out / name).read_bytes() == (world / "ds" / name).read_bytes(), name
    on_disk = {p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()}
    assert on_disk == {*names, share.CHECKSUMS_FILENAME}  # not ingest_config.yaml, which names local paths
    cells = " ".join(map(str, received.table.to_numpy().ravel())) + " ".join(on_disk)
    for source in (world / "raw" / "images").iterdir():  # original file names (site1_P0001_L, ...) stayed home
        assert source.stem not in cells


def test_flipped_byte_is_refused_as_tampered(world, tmp_path):
    size = (world / "ds.bundle").stat().st_size

    def flip(data):
        data[size // 2] ^= 0x01
    _refused(world, _write_changed(world, tmp_path, flip), tmp_path, "tampered: its signature does not match")


def test_cut_short_is_refused_as_truncated(world, tmp_path):
    def cut(data):
        del data[len(data) * 2 // 3:]
    _refused(world, _write_changed(world, tmp_path, cut), tmp_path, r"truncated: \d+ of \d+ encrypted bytes")

    def cut_header(data):
        del data[30:]
    _refused(world, _write_changed(world, tmp_path, cut_header), tmp_path, "truncated: the file ends inside")

    def extend(data):
        data += b"\0" * 10
    _refused(world, _write_changed(world, tmp_path, extend), tmp_path, "tampered: 10 unexpected byte")


def test_chunks_are_authenticated_even_under_a_trusted_signature(world, tmp_path):
    original = (world / "ds.bundle").read_bytes()
    start = _layout(original)[1]
    ciphertext = original[start:]
    sealed = CHUNK + share.TAG_BYTES
    assert len(ciphertext) > 3 * sealed
    flipped = bytearray(ciphertext)
    flipped[sealed + 5] ^= 0x01
    for ciphertext_now, match in ((bytes(flipped), "tampered: encrypted chunk 1 fails"),
                                  (ciphertext[:sealed] + ciphertext[2 * sealed:], "tampered: encrypted chunk 1 fails"),
                                  (ciphertext[:-(len(ciphertext) % sealed or sealed)], "truncated: it ends without")):
        path = tmp_path / "resigned.bundle"
        path.write_bytes(_resigned(world, ciphertext_now, original))
        _refused(world, path, tmp_path, match)


def test_wrong_coordinator_untrusted_site_and_non_bundles_are_refused(world, tmp_path):
    bundle = world / "ds.bundle"
    _refused(world, bundle, tmp_path, "addressed to another coordinator", key="b.key")
    _refused(world, bundle, tmp_path, "signed by site key .* not trusted", trusted=("stranger.pub",))
    other = tmp_path / "other.bundle"
    share.pack(world / "ds", world / "a.pub", world / "stranger.key", other)
    _refused(world, other, tmp_path, "not trusted")
    assert _unpack(world, other, tmp_path / "both", trusted=("site.pub", "stranger.pub"))["images"] == 8
    (tmp_path / "plain.txt").write_text("hello")
    _refused(world, tmp_path / "plain.txt", tmp_path, "not a retfm share bundle")
    _refused(world, tmp_path / "missing.bundle", tmp_path, "no such bundle")


def test_output_folder_must_be_new_or_empty(world, tmp_path):
    out = tmp_path / "full"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(RetfmError, match="not an empty folder"):
        _unpack(world, world / "ds.bundle", out)
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    empty = tmp_path / "empty"
    empty.mkdir()
    assert _unpack(world, world / "ds.bundle", empty)["images"] == 8


def test_pack_refuses_what_is_not_a_deidentified_ingest(world, tmp_path):
    bundle = tmp_path / "x.bundle"
    with pytest.raises(RetfmError, match="not a retfm ingest folder"):
        share.pack(world / "raw", world / "a.pub", world / "site.key", bundle)
    ingest(world / "raw", tmp_path / "plain", IngestConfig(size=64, workers=1))
    with pytest.raises(RetfmError, match="not a de-identified ingest"):
        share.pack(tmp_path / "plain", world / "a.pub", world / "site.key", bundle)
    with pytest.raises(RetfmError, match="holds a site's public key, expected a coordinator's public key"):
        share.pack(world / "ds", world / "site.pub", world / "site.key", bundle)
    with pytest.raises(RetfmError, match="not a PEM private key"):
        share.pack(world / "ds", world / "a.pub", world / "site.pub", bundle)
    assert list(tmp_path.glob("x.bundle*")) == []


@pytest.mark.parametrize("change, match", [("name", "column.s. patient_name may identify"),
                                           ("path", "row 0: path is not images/<image_id>")])
def test_pack_refuses_identifying_columns_and_file_names(world, tmp_path, change, match):
    copy = tmp_path / "ds"
    shutil.copytree(world / "ds", copy)
    manifest = Manifest.read(copy)
    if change == "name":
        manifest.table["patient_name"] = "Jane Doe"
    else:
        (copy / manifest.table.loc[0, "path"]).rename(copy / "images/Jane_Doe_L.png")
        manifest.table.loc[0, "path"] = "images/Jane_Doe_L.png"
    manifest.write()
    with pytest.raises(RetfmError, match=match):
        share.pack(copy, world / "a.pub", world / "site.key", tmp_path / "x.bundle")


def test_unsafe_members_are_refused(tmp_path):
    for name, kind in (("../evil.png", tarfile.REGTYPE), ("/etc/evil", tarfile.REGTYPE),
                       ("images/./a.png", tarfile.REGTYPE), ("images/link", tarfile.SYMTYPE)):
        buffer = io.BytesIO()
        with tarfile.open(fileobj=buffer, mode="w") as tar:
            member = tarfile.TarInfo(name)
            member.type = kind
            member.linkname = "/etc/passwd" if kind == tarfile.SYMTYPE else ""
            tar.addfile(member, io.BytesIO(b""))
        buffer.seek(0)
        with pytest.raises(RetfmError, match="refused: .*member"):
            share._extract(buffer, tmp_path, "b.bundle")
    assert list(tmp_path.iterdir()) == []


def test_keys_are_owner_only_and_never_overwritten(world):
    assert (world / "a.key").stat().st_mode & 0o077 == 0 and (world / "site.key").stat().st_mode & 0o077 == 0
    with pytest.raises(RetfmError, match="refusing to overwrite"):
        share.generate_keys(world / "a", "coordinator")
    with pytest.raises(RetfmError, match="expected one of coordinator, site"):
        share.generate_keys(world / "c", "hub")


def test_cli_round_trip_and_one_line_refusal(world, tmp_path):
    runner = CliRunner()
    for prefix, role in (("coord", "coordinator"), ("site", "site")):
        result = runner.invoke(app, ["share", "keygen", "--out", str(tmp_path / prefix), "--role", role])
        assert result.exit_code == 0 and "fingerprint" in result.output, result.output
    bundle = tmp_path / "site1.bundle"
    result = runner.invoke(app, ["share", "pack", str(world / "ds"), "--to", str(tmp_path / "coord.pub"),
                                 "--sign", str(tmp_path / "site.key"), "--out", str(bundle)])
    assert result.exit_code == 0 and "packed 8 image(s)" in result.output, result.output
    result = runner.invoke(app, ["share", "unpack", str(bundle), "--key", str(tmp_path / "coord.key"),
                                 "--trust", str(tmp_path / "site.pub"), "--out", str(tmp_path / "got")])
    assert result.exit_code == 0 and "unpacked 8 image(s)" in result.output, result.output
    assert len(Manifest.read(tmp_path / "got")) == 8
    run = subprocess.run([sys.executable, "-m", "retfm.cli.main", "share", "unpack", str(bundle),
                          "--key", str(world / "b.key"), "--trust", str(tmp_path / "site.pub"),
                          "--out", str(tmp_path / "nope")], capture_output=True, text=True)
    lines = run.stderr.strip().splitlines()
    assert run.returncode == 2 and len(lines) == 1 and "Traceback" not in run.stderr, run.stderr
    assert str(bundle) in lines[0] and "addressed to another coordinator" in lines[0]
    assert not (tmp_path / "nope").exists()
