"""Taking a picture out of an HTTP request, with the size limit enforced while reading.

Two ways to send a picture: a multipart form with the file in the field ``image`` (what an
HTML form or ``curl -F image=@digit.png`` sends), or the raw bytes as the body with an image
content type (``curl --data-binary @digit.png -H 'Content-Type: image/png'``).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from starlette.datastructures import UploadFile
from starlette.formparsers import MultiPartException, MultiPartParser
from starlette.requests import ClientDisconnect, Request

from lenet.errors import (
    BadUpload,
    ClientDisconnected,
    UnsupportedImageFormat,
    UploadStalled,
    UploadTooLarge,
)

FIELD = "image"
# Raw bodies: any image type (the decoder checks the real format against its allow-list),
# and octet-stream for clients that do not know the type.
RAW_TYPES = ("image/", "application/octet-stream")
MULTIPART = "multipart/form-data"


def _too_large(limit: int) -> UploadTooLarge:
    return UploadTooLarge(
        f"The upload is larger than this service's limit of {limit:,} bytes. Send a smaller "
        "picture (a digit needs only a few hundred pixels a side), or start the service with "
        "a larger --max-upload."
    )


async def _read_body(request: Request, limit: int, stall_s: float) -> bytes:
    """The whole body, refused as soon as it passes ``limit`` bytes (never buffered past it),
    or as soon as ``stall_s`` seconds pass without a byte of it."""
    declared = request.headers.get("content-length")
    if declared is not None:
        try:
            if int(declared) > limit:
                raise _too_large(limit)
        except ValueError:
            raise BadUpload(f"Content-Length {declared!r} is not a number.") from None
    body = bytearray()
    chunks = request.stream()
    try:
        while True:
            try:
                chunk = await asyncio.wait_for(anext(chunks), stall_s)
            except StopAsyncIteration:
                break
            except asyncio.TimeoutError:
                raise UploadStalled(
                    f"The upload stalled: no data for {stall_s:g} s after {len(body):,} bytes. "
                    "Send the whole picture at once."
                ) from None
            body += chunk
            if len(body) > limit:
                raise _too_large(limit)
    except ClientDisconnect:
        # An aborted upload (a phone losing its network): nothing to answer, nothing failed.
        raise ClientDisconnected(
            f"The client closed the connection after {len(body):,} bytes of the upload."
        ) from None
    return bytes(body)


async def _once(data: bytes) -> AsyncIterator[bytes]:
    yield data


async def read_upload(request: Request, limit: int, stall_s: float = 10.0) -> bytes:
    """The picture's bytes from a multipart field ``image`` or a raw image body.

    Raises UploadTooLarge (413), UnsupportedImageFormat (415) for a content type that cannot
    carry a picture, BadUpload (422) for an empty body or a form without the field,
    UploadStalled (408) when the body stops arriving for ``stall_s`` seconds and
    ClientDisconnected (499) when the client goes away before it is whole.
    """
    content_type = request.headers.get("content-type", "").lower()
    is_form = content_type.startswith(MULTIPART)
    if not content_type and _no_body(request):
        # Nothing sent at all (a bare POST): what is missing is the picture, not its type.
        raise BadUpload("The request has no picture (no body). Send the image's bytes.")
    if not is_form and not content_type.startswith(RAW_TYPES):
        shown = content_type or "none"
        raise UnsupportedImageFormat(
            f"Content type {shown!r} cannot carry a picture. Send the image as the body with "
            f"an image/* content type, or as a multipart form with the file in field {FIELD!r}."
        )
    body = await _read_body(request, limit, stall_s)
    if is_form:
        body = await _form_file(request, body, limit)
    if not body:
        raise BadUpload("The picture is empty (0 bytes). Send the file's contents.")
    return body


def _no_body(request: Request) -> bool:
    """Whether the request says it has no body (length 0, or neither a length nor chunks)."""
    headers = request.headers
    return headers.get("content-length", "0").strip() == "0" and "transfer-encoding" not in headers


class _BytesFormParser(MultiPartParser):
    """Starlette's multipart parser, except that a part sent without a filename (``curl -F
    'image=<digit.png'``) keeps the bytes it came with. Starlette decodes such a part to text
    (UTF-8, else Latin-1), and a picture's bytes cannot always be told back from that text."""

    def on_part_end(self) -> None:
        part = self._current_part
        if part.file is None:
            self.items.append((part.field_name, bytes(part.data)))
        else:
            super().on_part_end()


async def _form_file(request: Request, body: bytes, limit: int) -> bytes:
    parser = _BytesFormParser(
        request.headers, _once(body), max_files=1, max_fields=16, max_part_size=limit
    )
    try:
        form = await parser.parse()
    except MultiPartException as exc:
        raise BadUpload(f"The multipart form could not be read: {str(exc).rstrip('.')}.") from None
    try:
        field = form.get(FIELD)
        if field is None:
            names = ", ".join(repr(k) for k in form.keys()) or "none"
            raise BadUpload(
                f"The form has no field {FIELD!r} (fields: {names}). Send the picture as "
                f"a file in field {FIELD!r}, e.g. curl -F {FIELD}=@digit.png."
            )
        if isinstance(field, UploadFile):
            return await field.read()
        return field  # a part without a filename: its bytes as sent
    finally:
        await form.close()
