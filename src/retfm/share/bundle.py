"""Secure uploads of a de-identified ingest (Global RETFound's second prong): ``retfm share``.

A site packs a de-identified ingest folder into one bundle file that only the coordinator can read, and that the
coordinator can check came whole and unchanged from a site it trusts. The bundle is::

    magic + format version | header length (4 bytes) | header (JSON) | ciphertext length (8 bytes)
    | Ed25519 signature (64 bytes) | ciphertext

- Confidentiality: X25519 key agreement between a fresh (ephemeral) key and the coordinator's public key,
  HKDF-SHA256 over the shared secret with the whole header as context, AES-256-GCM. The plaintext, a tar stream,
  is sealed in chunks of ``chunk_size`` bytes: chunk ``i`` has nonce ``i`` and associated data (``i``, last-chunk
  flag), so a chunk moved, dropped, repeated or appended fails its check. Nothing is ever held whole in memory.
- Integrity and authenticity: the site's Ed25519 key signs (digest of everything before the ciphertext length,
  ciphertext length, digest of the ciphertext). The header names the recipient's and the sender's key
  fingerprints; as it is part of the key derivation, a bundle re-signed by another site no longer decrypts.
- Contents: ``manifest.parquet``, ``deid_report.json`` and the images the manifest names, nothing else from the
  folder (not ``ingest_config.yaml``, which names local paths such as the key file); then ``retfm-share.json``,
  the checksum manifest (size and SHA-256 of every file, retfm version, both key fingerprints).

Packing refuses links (a bundle carries the files the ingest wrote, never what a link points to). Unpacking
checks, in order: magic and version, recipient, trusted sender, length (truncation), signature, every chunk's tag
and the last-chunk flag, member names and types, the checksum manifest, that the result is a readable
de-identified ingest, and that every image is the PNG or JPEG its name says and decodes within the pixel limit.
Files appear in the output folder only after every check has passed.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tarfile
import tempfile
from io import BytesIO
from pathlib import Path, PurePosixPath
from typing import BinaryIO

from cryptography.exceptions import InvalidSignature, InvalidTag, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from retfm import __version__
from retfm.data.deid import DEID_REPORT_FILENAME, column_kind
from retfm.data.ingest import IMAGES_DIRNAME
from retfm.data.io import NOT_AN_IMAGE, ImageRejected, decode_image
from retfm.data.manifest import IMAGE_INFO_COLUMNS, MANIFEST_FILENAME, REQUIRED_COLUMNS, Manifest, ManifestError
from retfm.data.paths import inside
from retfm.errors import RetfmError

MAGIC = b"retfm-share\n"
FORMAT_VERSION = 1
CHECKSUMS_FILENAME = "retfm-share.json"
CHUNK_SIZE = 1 << 20
CHUNK_SIZE_RANGE = (1 << 10, 1 << 26)
TAG_BYTES = 16
SIGNATURE_BYTES = 64
MAX_HEADER_BYTES = 1 << 12
ROLES = ("coordinator", "site")
_KEY_CONTEXT = b"retfm-share v1 key\x00"
_SIGNATURE_CONTEXT = b"retfm-share v1 signature\x00"
_KEY_KINDS = {X25519PrivateKey: "a coordinator's private key", X25519PublicKey: "a coordinator's public key",
              Ed25519PrivateKey: "a site's private signing key", Ed25519PublicKey: "a site's public key"}
# Columns a de-identified ingest keeps although their names look identifying: ingest writes them pseudonymised.
_PSEUDONYMOUS_COLUMNS = (set(REQUIRED_COLUMNS) | set(IMAGE_INFO_COLUMNS) | {"patient_id"}) - {"source"}
_IMAGE_SIGNATURES = {".png": b"\x89PNG\r\n\x1a\n", ".jpg": b"\xff\xd8\xff"}  # the formats ingest stores


# ---- keys ---------------------------------------------------------------------------------------------------------

def generate_keys(prefix: str | Path, role: str) -> tuple[Path, Path, str]:
    """Write ``PREFIX.key`` (private, owner-only) and ``PREFIX.pub``: an X25519 pair for a coordinator, who
    receives bundles, or an Ed25519 signing pair for a site, which sends them. Never overwrites. Returns both
    paths and the public key's fingerprint."""
    if role not in ROLES:
        raise RetfmError(f"--role {role!r}: expected one of {', '.join(ROLES)}")
    private_path, public_path = Path(f"{prefix}.key"), Path(f"{prefix}.pub")
    for path in (private_path, public_path):
        if path.exists():
            raise RetfmError(f"{path}: already exists; refusing to overwrite a key")
    key = X25519PrivateKey.generate() if role == "coordinator" else Ed25519PrivateKey.generate()
    private_path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(private_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                       serialization.NoEncryption()))
    public_path.write_bytes(key.public_key().public_bytes(serialization.Encoding.PEM,
                                                          serialization.PublicFormat.SubjectPublicKeyInfo))
    return private_path, public_path, fingerprint(key.public_key())


def fingerprint(public_key: X25519PublicKey | Ed25519PublicKey) -> str:
    """SHA-256 of the raw public key, in hex: what two people compare to know they hold the same key."""
    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()


def load_key(path: str | Path, kind: type):
    """The key in a PEM file written by :func:`generate_keys`, which must be of ``kind`` (one of the four
    cryptography key classes used here)."""
    path = Path(path)
    private = kind in (X25519PrivateKey, Ed25519PrivateKey)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise RetfmError(f"{path}: key file not found") from None
    except OSError as exc:
        raise RetfmError(f"{path}: cannot read key file ({exc.strerror})") from None
    try:
        key = (serialization.load_pem_private_key(data, password=None) if private
               else serialization.load_pem_public_key(data))
    except (ValueError, TypeError, UnsupportedAlgorithm):
        raise RetfmError(f"{path}: not a PEM {'private' if private else 'public'} key made by `retfm share "
                         f"keygen` (expected {_KEY_KINDS[kind]})") from None
    if not isinstance(key, kind):
        found = next((name for cls, name in _KEY_KINDS.items() if isinstance(key, cls)), "another kind of key")
        raise RetfmError(f"{path}: holds {found}, expected {_KEY_KINDS[kind]}")
    return key


# ---- pack ---------------------------------------------------------------------------------------------------------

def pack(data: str | Path, recipient_key: str | Path, signing_key: str | Path, out: str | Path,
         chunk_size: int = CHUNK_SIZE) -> dict:
    """Encrypt the de-identified ingest in ``data`` to the coordinator's public key ``recipient_key``, sign it
    with the site's ``signing_key`` and write the bundle to ``out`` (a temporary file, renamed when complete).
    Returns a summary: images, files, bytes, sender and recipient key fingerprints."""
    data, out = Path(data), Path(out)
    manifest = _read_deidentified(data, str(data), "not a retfm ingest folder")
    if not CHUNK_SIZE_RANGE[0] <= chunk_size <= CHUNK_SIZE_RANGE[1]:
        raise RetfmError(f"chunk size {chunk_size}: expected {CHUNK_SIZE_RANGE[0]} to {CHUNK_SIZE_RANGE[1]} bytes")
    if out.is_dir():
        raise RetfmError(f"{out}: is a folder; --out names the bundle file to write")
    recipient = load_key(recipient_key, X25519PublicKey)
    signer = load_key(signing_key, Ed25519PrivateKey)
    extras = [DEID_REPORT_FILENAME] if (manifest.root / DEID_REPORT_FILENAME).is_file() else []
    files = list(dict.fromkeys([MANIFEST_FILENAME, *extras, *manifest.table["path"].astype(str)]))
    root = manifest.root
    linked = next((name for name in files if inside(root, root / name) != root.resolve() / name), None)
    if linked is not None:
        raise RetfmError(f"{root / linked}: refused: a link; a bundle carries the files an ingest wrote, "
                         f"never what a link points to")

    ephemeral = X25519PrivateKey.generate()
    header = {"format": FORMAT_VERSION, "cipher": "X25519-HKDF-SHA256-AES-256-GCM", "chunk_size": chunk_size,
              "ephemeral_key": ephemeral.public_key().public_bytes(serialization.Encoding.Raw,
                                                                   serialization.PublicFormat.Raw).hex(),
              "recipient": fingerprint(recipient), "sender": fingerprint(signer.public_key())}
    header_bytes = json.dumps(header, sort_keys=True).encode()
    prefix = MAGIC + bytes([FORMAT_VERSION]) + len(header_bytes).to_bytes(4, "big") + header_bytes
    aead = AESGCM(_bundle_key(ephemeral.exchange(recipient), header_bytes))

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    try:
        with open(tmp, "wb") as handle:
            handle.write(prefix + bytes(8 + SIGNATURE_BYTES))  # length and signature are known only at the end
            sealer = _ChunkSealer(handle, aead, chunk_size)
            _write_tar(sealer, manifest.root, files, {"retfm_version": __version__, "sender": header["sender"],
                                                      "recipient": header["recipient"], "images": len(manifest)})
            sealer.finish()
            signature = signer.sign(_signed_statement(prefix, sealer.length, sealer.digest.digest()))
            handle.seek(len(prefix))
            handle.write(sealer.length.to_bytes(8, "big") + signature)
        tmp.replace(out)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return {"images": len(manifest), "files": len(files), "bytes": out.stat().st_size,
            "sender": header["sender"], "recipient": header["recipient"]}


def _read_deidentified(folder: Path, where: str, unreadable: str) -> Manifest:
    """The manifest of the ingest in ``folder``, with every image present and checked by check_deidentified."""
    try:
        manifest = Manifest.read(folder)
        manifest.validate(check_files=True)
    except ManifestError as exc:
        raise RetfmError(f"{where}: {unreadable} ({exc})") from None
    check_deidentified(manifest, where)
    return manifest


def check_deidentified(manifest: Manifest, where: str) -> None:
    """Refuse a manifest that is not marked de-identified by retfm, keeps a column whose name looks identifying,
    or stores an image under a name other than its pseudonymous image_id (which could be an original file name)."""
    if manifest.metadata.get("retfm.deidentified") != "true":
        raise RetfmError(f"{where}: not a de-identified ingest (ingest with --deid-key-file, or make a "
                         f"de-identified copy with `retfm data deid`)")
    table = manifest.table
    identifying = [c for c in table.columns if c not in _PSEUDONYMOUS_COLUMNS and column_kind(c)]
    if identifying:
        raise RetfmError(f"{where}: column(s) {', '.join(identifying)} may identify patients or name source "
                         f"files; not a de-identified ingest")
    for row, (image_id, path) in enumerate(zip(table["image_id"].astype(str), table["path"].astype(str))):
        stored = PurePosixPath(path)
        if stored.parent != PurePosixPath(IMAGES_DIRNAME) or stored.stem != image_id:
            raise RetfmError(f"{where}: row {row}: path is not {IMAGES_DIRNAME}/<image_id>.<ext>, as a "
                             f"de-identified ingest stores images; it may carry an original file name")


class _ChunkSealer:
    """A write-only file for tarfile: seals what it is given in chunks and writes them to ``handle``. The last
    chunk (which may be empty) is sealed by :meth:`finish`, with the last-chunk flag."""

    def __init__(self, handle: BinaryIO, aead: AESGCM, chunk_size: int):
        self.handle, self.aead, self.chunk_size = handle, aead, chunk_size
        self.buffer = bytearray()
        self.index = 0
        self.length = 0
        self.digest = hashlib.sha256()

    def write(self, data: bytes) -> int:
        self.buffer += data
        while len(self.buffer) > self.chunk_size:  # strictly more: the last chunk waits for finish()
            self._seal(bytes(self.buffer[:self.chunk_size]), last=False)
            del self.buffer[:self.chunk_size]
        return len(data)

    def finish(self) -> None:
        self._seal(bytes(self.buffer), last=True)
        self.buffer.clear()

    def _seal(self, chunk: bytes, last: bool) -> None:
        sealed = self.aead.encrypt(_nonce(self.index), chunk, _chunk_context(self.index, last))
        self.handle.write(sealed)
        self.digest.update(sealed)
        self.length += len(sealed)
        self.index += 1


class _HashingReader:
    def __init__(self, handle: BinaryIO):
        self.handle = handle
        self.digest = hashlib.sha256()
        self.size = 0

    def read(self, size: int = -1) -> bytes:
        data = self.handle.read(size)
        self.digest.update(data)
        self.size += len(data)
        return data


def _write_tar(stream: _ChunkSealer, root: Path, files: list[str], summary: dict) -> None:
    """A tar of ``files`` (paths relative to ``root``) then the checksum manifest; member owners, times and
    modes are fixed, so nothing about the site's accounts or disk travels."""
    entries = []
    with tarfile.open(fileobj=stream, mode="w|", format=tarfile.PAX_FORMAT) as tar:
        for name in files:
            path = root / name
            try:
                with open(path, "rb") as handle:
                    reader = _HashingReader(handle)
                    tar.addfile(_member(name, os.fstat(handle.fileno()).st_size), reader)
            except OSError as exc:
                raise RetfmError(f"{path}: cannot read file to pack ({exc.strerror or exc})") from None
            entries.append({"path": name, "size": reader.size, "sha256": reader.digest.hexdigest()})
        checksums = json.dumps({**summary, "files": entries}, indent=2).encode() + b"\n"
        tar.addfile(_member(CHECKSUMS_FILENAME, len(checksums)), BytesIO(checksums))


def _member(name: str, size: int) -> tarfile.TarInfo:
    member = tarfile.TarInfo(name)  # owner 0, no owner names, mtime 0
    member.size = size
    member.mode = 0o644
    return member


# ---- unpack -------------------------------------------------------------------------------------------------------

def unpack(bundle: str | Path, private_key: str | Path, trusted: list[str | Path], out: str | Path) -> dict:
    """Check ``bundle`` against the coordinator's ``private_key`` and the public keys of ``trusted`` sites, then
    write the ingest it holds to ``out`` (which must not exist, or be an empty folder). Returns a summary:
    images, files, the sender's key fingerprint and retfm version."""
    bundle, out = Path(bundle), Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise RetfmError(f"{out}: already exists and is not an empty folder; unpack into a new one")
    key = load_key(private_key, X25519PrivateKey)
    trusted_keys = {fingerprint(k): k for k in (load_key(path, Ed25519PublicKey) for path in trusted)}
    if not trusted_keys:
        raise RetfmError(f"{bundle}: no trusted site key given; pass the sending site's public key with --trust")
    try:
        handle = open(bundle, "rb")
    except FileNotFoundError:
        raise RetfmError(f"{bundle}: no such bundle") from None
    except OSError as exc:
        raise RetfmError(f"{bundle}: cannot read bundle ({exc.strerror})") from None
    with handle:
        header, opener = _verified(handle, str(bundle), key, trusted_keys)
        out.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".unpacking", dir=out.parent))
        try:
            written = _extract(opener, staging, str(bundle))
            opener.read_to_end()  # the tar may end before the last chunk, whose flag proves nothing is missing
            checksums = _check_checksums(staging / CHECKSUMS_FILENAME, written, header, str(bundle))
            manifest = _read_deidentified(staging, str(bundle), "does not hold a usable ingest")
            _check_images(manifest, str(bundle))
            if out.exists():
                out.rmdir()
            staging.rename(out)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
    return {"images": len(manifest), "files": len(checksums["files"]), "sender": header["sender"],
            "retfm_version": checksums.get("retfm_version")}


def _verified(handle: BinaryIO, bundle: str, key: X25519PrivateKey,
              trusted_keys: dict[str, Ed25519PublicKey]) -> tuple[dict, _ChunkOpener]:
    """Check the header, recipient, sender, length and signature; return the header and a reader of the
    plaintext positioned at the first chunk."""
    header, header_bytes, prefix = _read_header(handle, bundle)
    if header["recipient"] != fingerprint(key.public_key()):
        raise RetfmError(f"{bundle}: addressed to another coordinator (bundle for key {header['recipient'][:16]}, "
                         f"this key is {fingerprint(key.public_key())[:16]})")
    signer = trusted_keys.get(header["sender"])
    if signer is None:
        raise RetfmError(f"{bundle}: signed by site key {header['sender'][:16]}, which is not trusted here "
                         f"(pass that site's public key with --trust)")
    trailer = handle.read(8 + SIGNATURE_BYTES)
    if len(trailer) < 8 + SIGNATURE_BYTES:
        raise RetfmError(f"{bundle}: truncated: the file ends inside its header")
    length, signature = int.from_bytes(trailer[:8], "big"), trailer[8:]
    start = handle.tell()
    present = os.fstat(handle.fileno()).st_size - start
    if present < length:
        raise RetfmError(f"{bundle}: truncated: {present} of {length} encrypted bytes present")
    if present > length:
        raise RetfmError(f"{bundle}: tampered: {present - length} unexpected byte(s) after its end")
    digest = hashlib.sha256()
    for block in iter(lambda: handle.read(1 << 20), b""):
        digest.update(block)
    try:
        signer.verify(signature, _signed_statement(prefix, length, digest.digest()))
    except InvalidSignature:
        raise RetfmError(f"{bundle}: tampered: its signature does not match its contents") from None
    try:
        shared = key.exchange(X25519PublicKey.from_public_bytes(bytes.fromhex(header["ephemeral_key"])))
    except ValueError:
        raise RetfmError(f"{bundle}: damaged header: unusable ephemeral key") from None
    handle.seek(start)
    aead = AESGCM(_bundle_key(shared, header_bytes))
    return header, _ChunkOpener(handle, aead, header["chunk_size"], length, bundle)


def _read_header(handle: BinaryIO, bundle: str) -> tuple[dict, bytes, bytes]:
    """(header, its bytes, everything before the ciphertext length), after checking magic, version and fields."""
    magic = handle.read(len(MAGIC) + 1)
    if not magic or not MAGIC.startswith(magic[:len(MAGIC)]):
        raise RetfmError(f"{bundle}: not a retfm share bundle")
    if len(magic) <= len(MAGIC):
        raise RetfmError(f"{bundle}: truncated: the file ends inside its header")
    if magic[-1] != FORMAT_VERSION:
        raise RetfmError(f"{bundle}: bundle format {magic[-1]} is not supported by retfm {__version__} "
                         f"(it reads format {FORMAT_VERSION})")
    size_bytes = handle.read(4)
    header_size = int.from_bytes(size_bytes, "big")
    if len(size_bytes) == 4 and header_size > MAX_HEADER_BYTES:
        raise RetfmError(f"{bundle}: damaged header (claims {header_size} bytes)")
    header_bytes = handle.read(header_size)
    if len(size_bytes) < 4 or len(header_bytes) < header_size:
        raise RetfmError(f"{bundle}: truncated: the file ends inside its header")
    try:
        header = json.loads(header_bytes)
        fields_ok = (header["format"] == FORMAT_VERSION
                     and isinstance(header["chunk_size"], int)
                     and CHUNK_SIZE_RANGE[0] <= header["chunk_size"] <= CHUNK_SIZE_RANGE[1]
                     and len(bytes.fromhex(header["ephemeral_key"])) == 32
                     and all(len(bytes.fromhex(header[k])) == 32 for k in ("recipient", "sender")))
    except (ValueError, KeyError, TypeError):
        fields_ok = False
    if not fields_ok:
        raise RetfmError(f"{bundle}: damaged header")
    return header, header_bytes, magic + size_bytes + header_bytes


class _ChunkOpener:
    """A read-only file for tarfile: opens the chunks of ``length`` ciphertext bytes from ``handle`` in order."""

    def __init__(self, handle: BinaryIO, aead: AESGCM, chunk_size: int, length: int, bundle: str):
        self.handle, self.aead, self.chunk_size, self.bundle = handle, aead, chunk_size, bundle
        self.remaining = length
        self.index = 0
        self.chunk = b""
        self.offset = 0

    def read(self, size: int) -> bytes:
        pieces = []
        while size > 0:
            if self.offset == len(self.chunk):
                if self.remaining == 0:
                    break
                self.chunk, self.offset = self._open_next(), 0
            piece = self.chunk[self.offset:self.offset + size]
            self.offset += len(piece)
            size -= len(piece)
            pieces.append(piece)
        return b"".join(pieces)

    def read_to_end(self) -> None:
        while self.remaining:
            self._open_next()

    def _open_next(self) -> bytes:
        sealed_size = min(self.chunk_size + TAG_BYTES, self.remaining)
        sealed = self.handle.read(sealed_size)
        self.remaining -= sealed_size
        index, last = self.index, self.remaining == 0
        self.index += 1
        chunk = self._open(sealed, index, last)
        if chunk is not None:
            return chunk
        if last and self._open(sealed, index, last=False) is not None:
            raise RetfmError(f"{self.bundle}: truncated: it ends without its last chunk")
        raise RetfmError(f"{self.bundle}: tampered: encrypted chunk {index} fails its authentication check")

    def _open(self, sealed: bytes, index: int, last: bool) -> bytes | None:
        try:
            return self.aead.decrypt(_nonce(index), sealed, _chunk_context(index, last))
        except InvalidTag:
            return None


def _extract(stream: _ChunkOpener, folder: Path, bundle: str) -> dict[str, dict]:
    """Write the tar's members under ``folder``; return {path: {size, sha256}} of what was written. Only plain
    files with relative, normalised paths are accepted: no links, devices, absolute paths or '..'."""
    written: dict[str, dict] = {}
    try:
        with tarfile.open(fileobj=stream, mode="r|") as tar:
            for member in tar:
                name = member.name
                path = PurePosixPath(name)
                if not member.isreg():
                    raise RetfmError(f"{bundle}: refused: member {name!r} is not a plain file")
                if path.is_absolute() or ".." in path.parts or "\\" in name or str(path) != name or name in written:
                    raise RetfmError(f"{bundle}: refused: unsafe or repeated member path {name!r}")
                target = folder / name
                target.parent.mkdir(parents=True, exist_ok=True)
                source = tar.extractfile(member)
                digest, size = hashlib.sha256(), 0
                with open(target, "xb") as handle:
                    for block in iter(lambda: source.read(1 << 20), b""):
                        digest.update(block)
                        handle.write(block)
                        size += len(block)
                written[name] = {"size": size, "sha256": digest.hexdigest()}
    except tarfile.TarError as exc:
        raise RetfmError(f"{bundle}: damaged archive inside the bundle ({exc})") from None
    except OSError as exc:
        raise RetfmError(f"{bundle}: cannot write its files under {folder.parent} ({exc.strerror or exc})") from None
    return written


def _check_images(manifest: Manifest, bundle: str) -> None:
    """Every received image must be the PNG or JPEG its name says, and decode within the pixel limit."""
    for row, name in enumerate(manifest.table["path"].astype(str)):
        data = manifest.image_path(row).read_bytes()
        try:
            if not data.startswith(_IMAGE_SIGNATURES.get(PurePosixPath(name).suffix.lower(), b"-")):
                raise ImageRejected(NOT_AN_IMAGE, "not the PNG or JPEG its name says")
            decode_image(data)
        except ImageRejected as exc:
            raise RetfmError(f"{bundle}: refused: {name} is not a readable image ({exc})") from None


def _check_checksums(path: Path, written: dict[str, dict], header: dict, bundle: str) -> dict:
    """The checksum manifest must name the header's sender and recipient and list exactly the files written,
    with their sizes and SHA-256."""
    try:
        checksums = json.loads(path.read_text())
        expected = {e["path"]: {"size": e["size"], "sha256": e["sha256"]} for e in checksums["files"]}
        parties = (checksums["sender"], checksums["recipient"])
    except FileNotFoundError:
        raise RetfmError(f"{bundle}: incomplete: no checksum manifest ({CHECKSUMS_FILENAME})") from None
    except (ValueError, KeyError, TypeError):
        raise RetfmError(f"{bundle}: damaged checksum manifest") from None
    if parties != (header["sender"], header["recipient"]):
        raise RetfmError(f"{bundle}: tampered: its checksum manifest names other keys than its header")
    received = {name: entry for name, entry in written.items() if name != CHECKSUMS_FILENAME}
    missing = sorted(expected.keys() - received.keys())
    if missing:
        raise RetfmError(f"{bundle}: incomplete: {len(missing)} file(s) of its checksum manifest are missing, "
                         f"first {missing[0]}")
    unlisted = sorted(received.keys() - expected.keys())
    if unlisted:
        raise RetfmError(f"{bundle}: refused: {len(unlisted)} file(s) not in its checksum manifest, first "
                         f"{unlisted[0]}")
    for name, entry in expected.items():
        if received[name] != entry:
            raise RetfmError(f"{bundle}: tampered: {name} does not match its checksum")
    return checksums


# ---- shared by both ends ------------------------------------------------------------------------------------------

def _bundle_key(shared_secret: bytes, header_bytes: bytes) -> bytes:
    hkdf = HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=_KEY_CONTEXT + header_bytes)
    return hkdf.derive(shared_secret)


def _nonce(index: int) -> bytes:
    return index.to_bytes(12, "big")  # unique per chunk; the key itself is new for every bundle


def _chunk_context(index: int, last: bool) -> bytes:
    return index.to_bytes(8, "big") + (b"\x01" if last else b"\x00")


def _signed_statement(prefix: bytes, length: int, ciphertext_digest: bytes) -> bytes:
    return _SIGNATURE_CONTEXT + hashlib.sha256(prefix).digest() + length.to_bytes(8, "big") + ciphertext_digest
