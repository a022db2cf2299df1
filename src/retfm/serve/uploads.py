"""Reading uploads in memory: a size-capped request body, its multipart parts, and the images inside zips.

Starlette's own form parsing spools files over 1 MB to a temporary file on disk; uploads here never touch the
disk, so the body is read (up to the limit) and split with python-multipart's streaming parser into byte
strings. Only the parts' bytes are kept: their file names, which may identify a patient, are never read.
"""

from __future__ import annotations

import io
import zipfile
from dataclasses import dataclass

from python_multipart.exceptions import MultipartParseError
from python_multipart.multipart import MultipartParser, parse_options_header
from starlette.requests import Request

ZIP_MAGIC = b"PK\x03\x04"


class UploadError(Exception):
    """A request the service refuses as a whole; ``status`` is the HTTP status to answer with."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message


@dataclass
class Upload:
    """One uploaded image's bytes; ``item`` numbers it within the request (zip entries in the zip's order)."""

    item: int
    data: bytes
    zip_entry: int | None = None  # position within its zip, when it came from one


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, refused (413) as soon as it is known to exceed ``limit`` bytes."""
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise UploadError(413, f"upload of {int(declared)} bytes exceeds the limit of {limit} bytes")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise UploadError(413, f"upload exceeds the limit of {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


def file_parts(body: bytes, content_type: str) -> list[bytes]:
    """The contents of a multipart/form-data body's file parts, in order; any other body is one file."""
    kind, options = parse_options_header(content_type)
    if kind != b"multipart/form-data":
        return [body] if body else []
    boundary = options.get(b"boundary")
    if not boundary:
        raise UploadError(400, "multipart/form-data without a boundary")
    parts: list[bytes] = []
    current = io.BytesIO()
    headers: dict[bytes, bytes] = {}
    field = [b"", b""]

    def part_begin():
        current.seek(0)
        current.truncate()
        headers.clear()

    def header_field(data, start, end):
        field[0] += data[start:end]

    def header_value(data, start, end):
        field[1] += data[start:end]

    def header_end():
        headers[field[0].lower()] = field[1]
        field[0] = field[1] = b""

    def part_end():
        _, disposition = parse_options_header(headers.get(b"content-disposition", b"").decode("latin-1"))
        if b"filename" in disposition:  # a file, not a plain form field
            parts.append(current.getvalue())

    parser = MultipartParser(boundary, {
        "on_part_begin": part_begin, "on_part_data": lambda data, start, end: current.write(data[start:end]),
        "on_part_end": part_end, "on_header_field": header_field, "on_header_value": header_value,
        "on_header_end": header_end})
    try:
        parser.write(body)
        parser.finalize()
    except MultipartParseError as exc:
        raise UploadError(400, f"malformed multipart body ({exc})") from None
    return parts


def expand_zips(files: list[bytes], max_images: int, max_bytes: int) -> list[Upload]:
    """Each file as an upload, and each zip as its entries (folders skipped). Refused (413) when there are more
    than ``max_images``, or when entries would unpack to more than ``max_bytes``: a zip bomb stops at the first
    byte over the limit, whatever sizes its directory claims."""
    uploads: list[Upload] = []
    unpacked = 0
    too_many = UploadError(413, f"more than {max_images} images in one batch")
    for data in files:
        if not data.startswith(ZIP_MAGIC):
            uploads.append(Upload(len(uploads), data))
            if len(uploads) > max_images:
                raise too_many
            continue
        try:
            archive = zipfile.ZipFile(io.BytesIO(data))
            entries = [info for info in archive.infolist() if not info.is_dir()]
        except (zipfile.BadZipFile, OSError) as exc:
            raise UploadError(422, f"a zip upload cannot be read ({exc})") from None
        if len(uploads) + len(entries) > max_images:
            raise too_many
        for position, info in enumerate(entries):
            try:
                with archive.open(info) as entry:
                    content = entry.read(max_bytes - unpacked + 1)
            except (zipfile.BadZipFile, NotImplementedError, RuntimeError, OSError, EOFError) as exc:
                raise UploadError(422, f"zip entry {position} cannot be unpacked ({type(exc).__name__})") from None
            unpacked += len(content)
            if unpacked > max_bytes:
                raise UploadError(413, f"zip entries unpack to more than {max_bytes} bytes")
            uploads.append(Upload(len(uploads), content, zip_entry=position))
    return uploads
