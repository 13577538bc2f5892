"""Input images for image-to-image, inpainting and outpainting: loading, checks, and the
preprocessing diffusers applies, in NumPy and Pillow only (no torch).

The oracle is diffusers 0.42 as its pipelines are fed: `diffusers.utils.load_image`
(EXIF transpose, `.convert("RGB")`), then `VaeImageProcessor.preprocess` for images
(resize, /255, 2x-1) and the inpainting mask processor for masks (resize, grey, /255,
binarize), and `StableDiffusionInpaintPipeline` for `masked_image` and `mask_to_latent`.
Where sdrt differs it is on purpose:

* 16-bit images ("I;16", "I") are scaled to 8 bits (v / 257); Pillow's convert, which
  diffusers uses, clips them at 255, so nearly every pixel would be white.
* uint8 / uint16 / bool arrays are taken as 8-bit (16-bit, 0/1) pixels and go the PIL
  way, so `np.asarray(pil_image)` gives exactly what `pil_image` gives. diffusers'
  NumPy path assumes floats in [0, 1] and would turn uint8 pixels into 2 * 255 - 1.
* float arrays in [0, 1] follow diffusers' NumPy path exactly (nearest-neighbour resize
  as `torch.nn.functional.interpolate`, no quantization); grey arrays are repeated to
  RGB and alpha dropped (for masks: RGB to ITU-R 601 luma), as Pillow does for images.
* refused where diffusers goes on: an all-black mask (a whole generation that returns
  the input: usually an inverted mask), a mask whose repaint area vanishes at the latent
  size, a mask that differs only in its alpha channel.
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import warnings
from pathlib import Path
from typing import BinaryIO, Iterator, Sequence

import numpy as np
from PIL import Image, ImageFilter, ImageOps, UnidentifiedImageError

from sdrt.engines.errors import InvalidInput, InvalidType, MissingFile, SdrtError

MAX_PIXELS = 8192 * 8192            # 64 megapixels; checked on the header, before decoding
MAX_CANVAS_SIDE = 16384             # outpainting: no canvas side longer than this
FORMATS = ("PNG", "JPEG", "WEBP")   # what SD tools exchange; fewer decoders, less attack surface
DEFAULT_FEATHER = 32                # outpainting seam, pixels into the original

_RESAMPLE = Image.Resampling.LANCZOS        # VaeImageProcessor's default resample="lanczos"
_SIXTEEN_BIT = ("I", "I;16", "I;16B", "I;16L", "I;16N")
_SIGNATURES = ((b"\x89PNG", "PNG"), (b"\xff\xd8\xff", "JPEG"), (b"GIF8", "GIF"), (b"BM", "BMP"),
               (b"II*\x00", "TIFF"), (b"MM\x00*", "TIFF"), (b"8BPS", "PSD"), (b"%PDF", "PDF"),
               (b"\x00\x00\x01\x00", "ICO"), (b"qoif", "QOI"))


# --- loading -------------------------------------------------------------------------

def load_image(value, what: str = "image") -> Image.Image:
    """A path (PNG, JPEG, WebP), PIL image or array -> RGB image, EXIF orientation applied:
    diffusers.utils.load_image. Modes convert as its `.convert("RGB")` does: alpha is
    dropped, not composited (the colour under transparent pixels shows), so pixels match
    diffusers; palette, grey, CMYK through Pillow; 16-bit scaled (module doc)."""
    return _to_mode(ImageOps.exif_transpose(_as_pil(value, what)), "RGB", what)


def load_mask(value) -> Image.Image:
    """A mask as "L" (white = repaint): `load_image`, then grey (ITU-R 601 luma)."""
    return _to_mode(_mask_rgb(value), "L", "mask")


def _mask_rgb(value) -> Image.Image:
    # diffusers' examples read masks with load_image too, so alpha is ignored; a mask
    # that differs only in its alpha channel is refused rather than read as one grey.
    im = _as_pil(value, "mask")
    _check_not_alpha_only(im)
    return load_image(im, "mask")


def _as_pil(value, what: str) -> Image.Image:
    """Any accepted input as a PIL image, mode untouched (paths: decoded, EXIF kept)."""
    if isinstance(value, Image.Image):
        _check_pixels(value.width, value.height, what)
        return value
    if isinstance(value, np.ndarray):
        return _array_to_pil(value, what)
    if isinstance(value, (str, os.PathLike)):
        return _open(Path(value), what)
    if isinstance(value, (bytes, bytearray, memoryview)):
        return _decode(io.BytesIO(value), what)   # an encoded file, as a server receives it
    raise InvalidType(f"{what} must be a file path, encoded image bytes, a PIL image or a NumPy array, "
                      f"not {type(value).__name__}")


def _open(path: Path, what: str) -> Image.Image:
    if not path.exists():
        raise MissingFile(f"{what} file {path} does not exist")
    if path.is_dir():
        raise InvalidInput(f"{what} {path} is a folder; give an image file ({_formats()})")
    try:
        f = open(path, "rb")
    except OSError as e:
        raise InvalidInput(f"cannot read {what} file {path}: {e.strerror or e}") from None
    with f:
        return _decode(f, f"{what} file {path}")


def _decode(f: BinaryIO, where: str) -> Image.Image:
    """Decode an open image file (`where` names it in errors): PNG, JPEG or WebP only,
    its size checked on the header, before any pixel is decoded."""
    with _pillow_errors(where):
        head = f.read(16)
        f.seek(0)
        if not head:
            raise InvalidInput(f"{where} is empty; expected a {_formats()} image")
        try:
            im = Image.open(f, formats=FORMATS)
        except UnidentifiedImageError:
            raise InvalidInput(_unidentified(where, head)) from None
        with im:
            _check_pixels(im.width, im.height, where)
            im.load()   # decode now, so the file can be closed and truncation shows here
            return im.copy()


def _formats() -> str:
    return ", ".join(FORMATS[:-1]) + " or " + FORMATS[-1].replace("WEBP", "WebP")


def _unidentified(where: str, head: bytes) -> str:
    kind = next((name for sig, name in _SIGNATURES if head.startswith(sig)), None)
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        kind = "WEBP"
    if kind in FORMATS:
        return f"{where} is a damaged or truncated {kind} file"
    if kind is None and head[4:8] == b"ftyp":
        kind = f"{head[8:12].decode('ascii', 'replace').strip()} (HEIF/AVIF)"
    if kind is None:
        try:
            head.decode("utf-8")
            return f"{where} is a text file, not a {_formats()} image"
        except UnicodeDecodeError:
            return f"{where} is not a {_formats()} image (it starts with {head[:8]!r})"
    return f"{where} is a {kind} image; sdrt reads {_formats()}: convert it first"


@contextlib.contextmanager
def _pillow_errors(what: str, doing: str = "decoded") -> Iterator[None]:
    """Pillow's errors as one-line InvalidInput, and no Pillow warnings printed.

    DecompressionBombWarning (over Image.MAX_IMAGE_PIXELS) becomes an error too, so a
    size our own check lets through but Pillow's doubts is never just a printed line.
    (catch_warnings is not thread-safe before Python 3.14; the worst race is a warning
    shown or hidden in another thread.)"""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            yield
        except SdrtError:
            raise
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
            raise InvalidInput(f"{what} is too large to decode safely: {e} sdrt's limit is "
                               f"{MAX_PIXELS:,} pixels ({_side(MAX_PIXELS)}x{_side(MAX_PIXELS)})") from None
        except (OSError, SyntaxError, ValueError, EOFError, IndexError, MemoryError) as e:
            detail = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise InvalidInput(f"{what} cannot be {doing}: {detail}") from None


def _check_pixels(w: int, h: int, what: str) -> None:
    if w <= 0 or h <= 0:
        raise InvalidInput(f"{what} is {w}x{h}: it has no pixels")
    if w * h > MAX_PIXELS:
        raise InvalidInput(f"{what} is {w}x{h} = {w * h:,} pixels, over the limit of "
                           f"{MAX_PIXELS:,} ({_side(MAX_PIXELS)}x{_side(MAX_PIXELS)}); "
                           f"scale it down first")


def _side(pixels: int) -> int:
    return int(pixels ** 0.5)


def _to_mode(im: Image.Image, mode: str, what: str) -> Image.Image:
    with _pillow_errors(f"{what} of mode {im.mode}", f"converted to {mode}"):
        if im.mode in _SIXTEEN_BIT:
            im = _sixteen_to_eight(im)
        return im.convert(mode)   # a copy when already in `mode`


def _sixteen_to_eight(im: Image.Image) -> Image.Image:
    # "I" from PNG/TIFF holds 16-bit samples too. Round-to-nearest of v / 257 maps
    # 0..65535 onto 0..255 with 65535 -> 255 and 257 * k -> k.
    a = np.asarray(im).astype(np.float64)
    return Image.fromarray(np.clip(np.rint(a / 257.0), 0, 255).astype(np.uint8), "L")


def _check_not_alpha_only(im: Image.Image) -> None:
    if im.mode not in ("LA", "RGBA", "PA", "La", "RGBa") and not (
            im.mode == "P" and "transparency" in im.info):
        return
    with _pillow_errors("mask"):
        alpha = np.asarray(im.convert("RGBA"))[..., 3]
        grey = np.asarray(im.convert("L"))
    if grey.min() == grey.max() and alpha.min() != alpha.max():
        raise InvalidInput(
            f"mask has a single grey value ({grey.min()}) and only its alpha channel varies; "
            f"sdrt reads a mask's brightness like diffusers (white = repaint, black = keep), "
            f"not its transparency: save it as a black-and-white image")


# --- arrays --------------------------------------------------------------------------

def _check_array(a: np.ndarray, what: str) -> None:
    if a.ndim not in (2, 3) or (a.ndim == 3 and a.shape[2] not in (1, 3, 4)):
        raise InvalidInput(f"{what} array has shape {a.shape}; expected one image as HxW or "
                           f"HxWxC with C = 1, 3 or 4 channels last")
    _check_pixels(a.shape[1], a.shape[0], f"{what} array")
    ok = ("uint8", "uint16", "float16", "float32", "float64") + (("bool",) if what == "mask" else ())
    if a.dtype.name not in ok:
        raise InvalidInput(f"{what} array has dtype {a.dtype}; expected {', '.join(ok)} "
                           f"(uint8 0..255, uint16 0..65535, floats 0..1)")
    if a.dtype.kind == "f":
        if not np.isfinite(a).all():
            raise InvalidInput(f"{what} array contains NaN or infinity")
        lo, hi = float(a.min()), float(a.max())
        if lo < 0.0 or hi > 1.0:
            raise InvalidInput(f"{what} array holds floats from {lo:g} to {hi:g}; expected 0..1 "
                               f"(for -1..1 data pass (x + 1) / 2)")


def _array_to_pil(a: np.ndarray, what: str) -> Image.Image:
    _check_array(a, what)
    if a.ndim == 3 and a.shape[2] == 1:
        a = a[..., 0]
    if a.dtype == np.uint16:
        a = np.rint(a / 257.0).astype(np.uint8)
    elif a.dtype == np.bool_:
        a = a.astype(np.uint8) * 255
    elif a.dtype.kind == "f":
        a = (a * 255).round().astype(np.uint8)   # diffusers' numpy_to_pil
    return Image.fromarray(np.ascontiguousarray(a))   # mode L, RGB or RGBA from the shape


def _float_channels(a: np.ndarray, what: str, grey: bool) -> np.ndarray:
    """A checked float HxW[xC] array -> (C, H, W), C = 3 (RGB) or 1 (grey), computed in
    float32 or wider like diffusers (which keeps the array's dtype)."""
    _check_array(a, what)
    a = a.astype(np.result_type(a.dtype, np.float32), copy=False)
    a = a[..., None] if a.ndim == 2 else a
    if grey and a.shape[2] >= 3:    # ITU-R 601-2 luma, the weights of Pillow's convert("L")
        a = a[..., :1] * 0.299 + a[..., 1:2] * 0.587 + a[..., 2:3] * 0.114
    elif not grey:
        a = np.repeat(a, 3, axis=2) if a.shape[2] == 1 else a[..., :3]
    return a[..., :1].transpose(2, 0, 1) if grey else a.transpose(2, 0, 1)


def _nearest_index(src: int, dst: int) -> np.ndarray:
    """Source index of each output index, as torch's default `interpolate(mode="nearest")`:
    floor(i * float32(src / dst)), clamped (aten/src/ATen/native/UpSample.h)."""
    if src == dst:
        return np.arange(dst)
    scale = np.float32(src) / np.float32(dst)
    return np.minimum(np.floor(np.arange(dst, dtype=np.float32) * scale).astype(np.int64), src - 1)


def _resize_nearest(x: np.ndarray, height: int, width: int) -> np.ndarray:
    return x[..., _nearest_index(x.shape[-2], height)[:, None], _nearest_index(x.shape[-1], width)]


# --- preprocessing -------------------------------------------------------------------

def _check_size(height, width) -> tuple[int, int]:
    for name, v in (("height", height), ("width", width)):
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v <= 0:
            raise InvalidInput(f"{name} must be a positive whole number of pixels, not {v!r}")
    _check_pixels(int(width), int(height), "requested size")
    return int(height), int(width)


def _resize(im: Image.Image, height: int, width: int) -> Image.Image:
    # VaeImageProcessor.resize: resize((width, height), lanczos, reducing_gap=None);
    # Pillow returns a copy when the size already matches.
    with _pillow_errors("image", "resized"):
        return im.resize((width, height), resample=_RESAMPLE)


def preprocess_image(img, height: int, width: int, normalize: bool = True, what: str = "image") -> np.ndarray:
    """(1, 3, height, width) float32 in [-1, 1]: VaeImageProcessor(vae_scale_factor=8)
    .preprocess(load_image(img), height=height, width=width), so RGB PIL images and
    uint8 arrays give exactly what diffusers gives; float arrays take diffusers' NumPy
    path (module doc). The size is used as given: the caller passes the artifact's
    static size (diffusers would also round it down to the VAE's multiple).
    normalize=False: pixels in [0, 1], as the ControlNet pipelines' control image
    processor (do_normalize=False) gives them."""
    height, width = _check_size(height, width)
    if isinstance(img, np.ndarray) and img.dtype.kind == "f":
        x = _resize_nearest(_float_channels(img, what, grey=False), height, width)
        return (2.0 * x - 1.0 if normalize else x)[None].astype(np.float32)
    x = np.asarray(_resize(load_image(img, what), height, width)).astype(np.float32) / 255.0  # pil_to_numpy
    return np.ascontiguousarray((2.0 * x - 1.0 if normalize else x).transpose(2, 0, 1)[None])   # normalize


def preprocess_mask(mask, height: int, width: int, image_size: tuple[int, int] | None = None
                    ) -> np.ndarray:
    """(1, 1, height, width) float32 of 0/1 (1 = repaint): diffusers' mask processor
    (do_normalize=False, do_binarize=True, do_convert_grayscale=True) on
    load_image(mask): resize, grey, /255, 0 below 0.5 and 1 from 0.5 on (8-bit values
    >= 128 repaint). With `image_size` (width, height of its image), a mask of another
    aspect ratio (over 1 %) is refused: stretched to the output size, it would not line
    up. An all-black result (nothing to repaint at this size) is refused."""
    height, width = _check_size(height, width)
    if isinstance(mask, np.ndarray) and mask.dtype.kind == "f":
        m = _float_channels(mask, "mask", grey=True)
        size = m.shape[2], m.shape[1]
        x = _resize_nearest(m, height, width)
    else:
        rgb = _mask_rgb(mask)
        size = rgb.size
        x = np.asarray(_to_mode(_resize(rgb, height, width), "L", "mask")).astype(np.float32)[None] / 255.0
    if image_size is not None and abs(size[0] * image_size[1] / (size[1] * image_size[0]) - 1) > 0.01:
        raise InvalidInput(f"mask is {size[0]}x{size[1]} but the image is "
                           f"{image_size[0]}x{image_size[1]}: their aspect ratios differ, "
                           f"so the mask would not line up; give a mask of the image's size")
    out = np.where(x >= 0.5, 1.0, 0.0).astype(np.float32)[None]   # VaeImageProcessor.binarize
    if not out.any():
        raise InvalidInput(f"mask selects nothing to repaint at {width}x{height}: every pixel is "
                           f"below half grey (white = repaint, black = keep; is it inverted?)")
    return out


def mask_to_latent(mask: np.ndarray, latent_h: int, latent_w: int) -> np.ndarray:
    """(N, 1, H, W) 0/1 mask -> (N, 1, latent_h, latent_w) float32, nearest neighbour as
    StableDiffusionInpaintPipeline.prepare_mask_latents (torch interpolate's default).
    Refuses a mask whose repaint area falls between the sampled pixels: the U-Net would
    be told to keep everything while the masked image has a hole."""
    latent_h, latent_w = _check_size(latent_h, latent_w)
    if not isinstance(mask, np.ndarray) or mask.ndim != 4 or mask.shape[1] != 1:
        raise InvalidInput(f"mask must be an (N, 1, H, W) array from preprocess_mask, "
                           f"not {getattr(mask, 'shape', type(mask).__name__)}")
    out = _resize_nearest(mask, latent_h, latent_w).astype(np.float32)
    if mask.any() and not out.any():
        raise InvalidInput(f"mask's repaint area vanishes at the latent size {latent_w}x{latent_h} "
                           f"(one latent per {mask.shape[3] / latent_w:g}x{mask.shape[2] / latent_h:g} "
                           f"pixels); draw it wider than that")
    return out


def masked_image(image: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """The inpainting U-Net's conditioning image, diffusers' `init_image * (mask < 0.5)`:
    pixels to repaint set to 0 (mid grey in [-1, 1])."""
    if image.shape[-2:] != mask.shape[-2:]:
        raise InvalidInput(f"image {image.shape} and mask {mask.shape} differ in height/width")
    return (image * (mask < 0.5)).astype(np.float32)


# --- outpainting ---------------------------------------------------------------------

def _check_margins(margins, shown: str) -> tuple[int, int, int, int]:
    if not isinstance(margins, (tuple, list)) or len(margins) != 4:
        raise InvalidInput(f"margins {shown} must be 4 pixel counts (left, top, right, bottom)")
    for v in margins:
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 0:
            raise InvalidInput(f"margins {shown}: {v!r} is not a non-negative whole number of pixels")
    if not any(margins):
        raise InvalidInput(f"margins {shown} are all 0: nothing to outpaint")
    return tuple(int(v) for v in margins)


def parse_margins(text: str) -> tuple[int, int, int, int]:
    """CLI margins -> (left, top, right, bottom): "N" all sides, "X,Y" left/right and
    top/bottom, "L,T,R,B". x before y like PIL boxes (not CSS's top-first order)."""
    if not isinstance(text, str):
        raise InvalidType(f"margins must be text like '64' or '0,0,128,0', not {type(text).__name__}")
    parts = [p.strip() for p in text.split(",")]
    if len(parts) not in (1, 2, 4):
        raise InvalidInput(f"margins {text!r}: give N (all sides), X,Y (left/right, top/bottom) "
                           f"or L,T,R,B, in pixels")
    for p in parts:
        if not re.fullmatch(r"[0-9]{1,9}", p):
            raise InvalidInput(f"margins {text!r}: {p!r} is not a non-negative whole number of pixels")
    v = [int(p) for p in parts]
    full = v * 4 if len(v) == 1 else v * 2 if len(v) == 2 else v
    return _check_margins(tuple(full), repr(text))


def outpaint_canvas(img, margins: Sequence[int], height: int | None = None,
                    width: int | None = None, *, feather: int | None = None
                    ) -> tuple[Image.Image, Image.Image]:
    """Extend `img` by (left, top, right, bottom) pixels -> (RGB canvas, "L" mask), both at
    the canvas's natural size; preprocess_image / preprocess_mask resize them to the
    artifact's size. With height and width (the artifact's), a canvas of another aspect
    ratio is refused and the message proposes margins that fit.

    Fill: edge pixels extended outwards, then Gaussian-blurred (radius a quarter of the
    widest margin, 2..64 px) and the original pasted back. Deterministic, no seam, and
    only low frequencies: at strength < 1 (or with a text-to-image U-Net) the model keeps
    the colours and adds detail, where noise would survive as grain; the inpainting
    U-Net never sees it (masked_image zeroes it).

    Mask: 255 over the new area; feather (default DEFAULT_FEATHER, at most half the
    image's shorter side); inside the original a linear ramp 255 * (1 - d / feather)
    over `feather` pixels from each extended side (d: distance from the pixel's centre to
    that side), 0 beyond. preprocess_mask's threshold makes the model repaint the new area
    and about feather / 2 pixels of the original, so it can join the seam; the soft ramp
    is for blending the result back over the original."""
    src = load_image(img)
    left, top, right, bottom = _check_margins(margins, repr(margins))
    w, h = src.size
    cw, ch = w + left + right, h + top + bottom
    if max(cw, ch) > MAX_CANVAS_SIDE:
        raise InvalidInput(f"margins {margins!r} make a {cw}x{ch} canvas; its sides must be at "
                           f"most {MAX_CANVAS_SIDE} pixels")
    _check_pixels(cw, ch, f"outpainting canvas for margins {margins!r}")
    if feather is None:
        feather = min(DEFAULT_FEATHER, min(w, h) // 2)
    if isinstance(feather, bool) or not isinstance(feather, (int, np.integer)) \
            or not 0 <= feather <= min(w, h) // 2:
        raise InvalidInput(f"feather {feather!r} must be a whole number of pixels from 0 to "
                           f"{min(w, h) // 2} (half the image's shorter side)")
    if (height is None) != (width is None):
        raise InvalidInput("give both height and width, or neither")
    if height is not None:
        _check_aspect((left, top, right, bottom), cw, ch, *_check_size(height, width))

    canvas = np.pad(np.asarray(src), ((top, bottom), (left, right), (0, 0)), mode="edge")
    radius = min(64.0, max(2.0, max(left, top, right, bottom) / 4))
    filled = Image.fromarray(canvas).filter(ImageFilter.GaussianBlur(radius))
    filled.paste(src, (left, top))

    def ramp(n: int, near: bool, far: bool) -> np.ndarray:   # seam distance along one axis
        d = np.arange(n) + 0.5
        dist = np.full(n, np.inf)
        if near:
            dist = np.minimum(dist, d)
        if far:
            dist = np.minimum(dist, d[::-1])
        return dist

    dist = np.minimum(ramp(h, top > 0, bottom > 0)[:, None], ramp(w, left > 0, right > 0)[None, :])
    inner = np.clip(1.0 - dist / feather, 0.0, 1.0) if feather else np.zeros((h, w))
    mask = np.full((ch, cw), 255, np.uint8)
    mask[top:top + h, left:left + w] = np.rint(inner * 255).astype(np.uint8)
    return filled, Image.fromarray(mask, "L")


def _check_aspect(margins, cw: int, ch: int, height: int, width: int) -> None:
    want = width / height
    if abs(cw / ch / want - 1) <= 0.01:
        return
    left, top, right, bottom = margins
    if cw / ch < want:
        extra = round(ch * want) - cw
        left, right = left + extra // 2, right + extra - extra // 2
    else:
        extra = round(cw / want) - ch
        top, bottom = top + extra // 2, bottom + extra - extra // 2
    raise InvalidInput(f"margins {tuple(margins)} make a {cw}x{ch} canvas, but the model draws "
                       f"{width}x{height}: the canvas would be stretched; margins "
                       f"{left},{top},{right},{bottom} give the model's aspect ratio")
