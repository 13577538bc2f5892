"""Images that arrive in requests: base64 (AUTOMATIC1111's JSON, with or without a
`data:` URL prefix) or uploaded files (OpenAI's multipart), checked before a job is
queued: the size on the header against the server's limit, then a full decode
through the runtime's image checks (runtime/inputs.py), whose errors name what was
wrong. What goes into a job is the encoded bytes, which every runner decodes the same way.
"""

from __future__ import annotations

import base64
import binascii
import io
import re
import warnings

import numpy as np
from PIL import Image, ImageFilter

from sdrt.engines.errors import InvalidInput

_DATA_URL = re.compile(r"^data:image/[a-zA-Z0-9.+-]+;base64,")


def from_base64(text: object, what: str, max_pixels: int) -> bytes:
    """Base64 text -> checked encoded image bytes."""
    if not isinstance(text, str):
        raise InvalidInput(f"{what} must be a base64-encoded PNG, JPEG or WebP string, not {type(text).__name__}")
    text = _DATA_URL.sub("", text.strip(), count=1)
    try:
        data = base64.b64decode("".join(text.split()), validate=True)
    except (binascii.Error, ValueError):
        raise InvalidInput(f"{what} is not valid base64 (a PNG, JPEG or WebP file, base64-encoded)") from None
    return checked(data, what, max_pixels)


def checked(data: bytes, what: str, max_pixels: int) -> bytes:
    """Refuse an image over `max_pixels` (read from its header, before decoding) or one
    the runtime would refuse; return the bytes unchanged."""
    from sdrt.runtime.inputs import load_image

    size = _header_size(data)
    if size is not None and size[0] * size[1] > max_pixels:
        w, h = size
        raise InvalidInput(f"{what} is {w}x{h} = {w * h:,} pixels, over this server's limit of {max_pixels:,} "
                           f"(--max-image-pixels)")
    load_image(data, what)
    return data


def _header_size(data: bytes) -> tuple[int, int] | None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            with Image.open(io.BytesIO(data)) as im:
                return im.size
        except Exception:   # noqa: BLE001 - undecodable: load_image names what is wrong
            return None


def png(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def a1111_mask(data: bytes, invert: bool, blur_x: float, blur_y: float) -> bytes:
    """AUTOMATIC1111's mask handling before inpainting: grey, inverted with
    inpainting_mask_invert, then blurred by mask_blur_x / mask_blur_y pixels (a Gaussian
    of that standard deviation; AUTOMATIC1111 uses OpenCV's kernel of 2.5 x blur + 1)."""
    from sdrt.runtime.inputs import load_mask

    mask = load_mask(data)
    if invert:
        mask = Image.fromarray(255 - np.asarray(mask))
    if blur_x > 0 and blur_x == blur_y:
        mask = mask.filter(ImageFilter.GaussianBlur(blur_x))
    elif blur_x > 0 or blur_y > 0:
        mask = mask.filter(ImageFilter.GaussianBlur((blur_x, blur_y)))
    return png(mask)


def openai_mask(data: bytes, what: str, max_pixels: int) -> bytes:
    """OpenAI's mask (a PNG whose fully transparent pixels mark what to edit) -> sdrt's
    (white = repaint)."""
    checked(data, what, max_pixels)
    clear = _transparent(data)
    if clear is None:
        raise InvalidInput(f"{what} has no alpha channel: as in OpenAI's API, the mask is a PNG whose fully "
                           f"transparent pixels mark the area to edit")
    return _white_where(clear)


def transparent_area(data: bytes) -> bytes | None:
    """The mask of an image's own fully transparent pixels (OpenAI's edits without a
    mask), or None when it has none."""
    clear = _transparent(data)
    return _white_where(clear) if clear is not None and clear.any() else None


def _transparent(data: bytes) -> np.ndarray | None:
    """Where the image is fully transparent; None when it has no alpha at all."""
    with Image.open(io.BytesIO(data)) as im:
        if "A" not in im.getbands() and not (im.mode == "P" and "transparency" in im.info):
            return None
        return np.asarray(im.convert("RGBA"))[..., 3] == 0


def _white_where(repaint: np.ndarray) -> bytes:
    return png(Image.fromarray(np.where(repaint, 255, 0).astype(np.uint8)))


def size_of(data: bytes) -> tuple[int, int]:
    with Image.open(io.BytesIO(data)) as im:
        return im.size
