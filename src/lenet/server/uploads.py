"""Taking a picture out of an HTTP request, with the size limit enforced while reading.

Two ways to send a picture: a multipart form with the file in the field ``image`` (what an
HTML form or ``curl -F image=@digit.png`` sends), or the raw bytes as the body with an image
content type (``curl --data-binary @digit.png -H 'Content-Type: image/png'``).
"""

from __future__ import annotations

from collections.abc import AsyncIterator

from starlette.datastructures import UploadFile
from starlette.formparsers import MultiPartException, MultiPartParser
from starlette.requests import Request

from lenet.errors import BadUpload, UnsupportedImageFormat, UploadTooLarge

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


async def _read_body(request: Request, limit: int) -> bytes:
    """The whole body, refused as soon as it passes ``limit`` bytes (never buffered past it)."""
    declared = request.headers.get("content-length")
    if declared is not None:
        try:
            if int(declared) > limit:
                raise _too_large(limit)
        except ValueError:
            raise BadUpload(f"Content-Length {declared!r} is not a number.") from None
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise _too_large(limit)
    return bytes(body)


async def _once(data: bytes) -> AsyncIterator[bytes]:
    yield data


async def read_upload(request: Request, limit: int) -> bytes:
    """The picture's bytes from a multipart field ``image`` or a raw image body.

    Raises UploadTooLarge (413), UnsupportedImageFormat (415) for a content type that cannot
    carry a picture, and BadUpload (422) for an empty body or a form without the field.
    """
    content_type = request.headers.get("content-type", "").lower()
    is_form = content_type.startswith(MULTIPART)
    if not is_form and not content_type.startswith(RAW_TYPES):
        shown = content_type or "none"
        raise UnsupportedImageFormat(
            f"Content type {shown!r} cannot carry a picture. Send the image as the body with "
            f"an image/* content type, or as a multipart form with the file in field {FIELD!r}."
        )
    body = await _read_body(request, limit)
    if is_form:
        body = await _form_file(request, body, limit)
    if not body:
        raise BadUpload("The picture is empty (0 bytes). Send the file's contents.")
    return body


async def _form_file(request: Request, body: bytes, limit: int) -> bytes:
    parser = MultiPartParser(
        request.headers, _once(body), max_files=1, max_fields=16, max_part_size=limit
    )
    try:
        form = await parser.parse()
    except MultiPartException as exc:
        raise BadUpload(f"The multipart form could not be read: {exc}.") from None
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
        return field.encode("utf-8")  # a text field: the decoder will say it is no image
    finally:
        await form.close()
