"""Input images for img2img, inpainting and outpainting (runtime/inputs.py).

Oracles: diffusers' VaeImageProcessor (images and masks), diffusers.utils.load_image
(files), torch.nn.functional.interpolate (latent masks); the rest are stated properties.
"""

from __future__ import annotations

import io
import os
import struct
import warnings
import zlib

import numpy as np
import pytest
from PIL import Image, ImageDraw, ImageFilter

from sdrt.engines.errors import InvalidInput, InvalidType, MissingFile
from sdrt.runtime import inputs
from sdrt.runtime.inputs import (load_image, load_mask, mask_to_latent, masked_image, outpaint_canvas,
                                 parse_margins, preprocess_image, preprocess_mask)


@pytest.fixture(scope="module")
def vae_processor():
    from diffusers.image_processor import VaeImageProcessor
    return VaeImageProcessor(vae_scale_factor=8)


@pytest.fixture(scope="module")
def mask_processor():
    from diffusers.image_processor import VaeImageProcessor
    return VaeImageProcessor(vae_scale_factor=8, do_normalize=False, do_binarize=True,
                             do_convert_grayscale=True)


def _photo(w: int, h: int, seed: int = 0, mode: str = "RGB") -> Image.Image:
    """Smooth gradients plus noise: content where Lanczos and rounding both matter."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w]
    base = np.stack([x * 255 / max(w - 1, 1), y * 255 / max(h - 1, 1), (x + y) % 256], -1)
    pixels = np.clip(base + rng.normal(0, 30, base.shape), 0, 255).astype(np.uint8)
    im = Image.fromarray(pixels, "RGB")
    if mode == "RGBA":
        alpha = Image.fromarray(rng.integers(0, 256, (h, w), dtype=np.uint8), "L")
        im.putalpha(alpha)
    elif mode != "RGB":
        im = im.convert(mode)
    return im


def _masks(w: int, h: int) -> dict[str, Image.Image]:
    rect = Image.new("L", (w, h), 0)
    ImageDraw.Draw(rect).rectangle((w // 4, h // 3, w * 3 // 4, h - 5), fill=255)
    circle = Image.new("L", (w, h), 0)
    ImageDraw.Draw(circle).ellipse((w // 5, h // 5, w * 4 // 5, h * 4 // 5), fill=255)
    rng = np.random.default_rng(3)
    noise = Image.fromarray(rng.integers(0, 256, (h, w), dtype=np.uint8), "L")
    blobs = noise.filter(ImageFilter.GaussianBlur(3)).point(lambda v: 255 if v > 128 else 0)
    # soft edges: a horizontal ramp through 126..130, where 127 -> 0 and 128 -> 1
    soft = Image.fromarray(np.tile(np.linspace(120, 136, w).round().astype(np.uint8), (h, 1)), "L")
    feathered = circle.filter(ImageFilter.GaussianBlur(4))
    return {"rectangle": rect, "circle": circle, "blobs": blobs, "soft": soft, "feathered": feathered}


SIZES = [((100, 70), (64, 64)), ((64, 96), (64, 64)), ((64, 64), (64, 64)), ((40, 24), (48, 64)),
         ((33, 77), (96, 40))]   # (source w, h), (target h, w)


# --- preprocessing against diffusers ---------------------------------------------------

@pytest.mark.parametrize("src,dst", SIZES)
@pytest.mark.parametrize("mode", ["RGB", "RGBA", "P", "L", "LA"])
def test_preprocess_image_matches_vae_image_processor(vae_processor, src, dst, mode):
    # pipelines get images through diffusers.utils.load_image (RGB); for RGB it is a copy
    from diffusers.utils import load_image as diffusers_load_image
    im = _photo(*src, mode=mode)
    want = vae_processor.preprocess(diffusers_load_image(im), height=dst[0], width=dst[1]).numpy()
    if mode == "RGB":
        np.testing.assert_array_equal(want, vae_processor.preprocess(im, height=dst[0], width=dst[1]).numpy())
    got = preprocess_image(im, *dst)
    assert got.dtype == np.float32 and got.shape == (1, 3, *dst)
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("src,dst", SIZES)
def test_uint8_array_gives_what_its_pil_image_gives(vae_processor, src, dst):
    im = _photo(*src)
    want = vae_processor.preprocess(im, height=dst[0], width=dst[1]).numpy()
    np.testing.assert_array_equal(preprocess_image(np.asarray(im), *dst), want)
    grey = im.convert("L")
    np.testing.assert_array_equal(preprocess_image(np.asarray(grey), *dst),
                                  vae_processor.preprocess(grey.convert("RGB"), height=dst[0],
                                                           width=dst[1]).numpy())


@pytest.mark.parametrize("src,dst", SIZES)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_float_array_matches_diffusers_numpy_path(vae_processor, src, dst, dtype):
    a = np.random.default_rng(1).random((src[1], src[0], 3)).astype(dtype)
    want = vae_processor.preprocess(a, height=dst[0], width=dst[1]).numpy().astype(np.float32)
    np.testing.assert_array_equal(preprocess_image(a, *dst), want)


def test_float_grey_and_rgba_arrays_become_rgb(vae_processor):
    a = np.random.default_rng(2).random((40, 30, 4)).astype(np.float32)
    want = vae_processor.preprocess(np.ascontiguousarray(a[..., :3]), height=32, width=32).numpy()
    np.testing.assert_array_equal(preprocess_image(a, 32, 32), want)
    g = a[..., 0]
    np.testing.assert_array_equal(preprocess_image(g, 32, 32),
                                  preprocess_image(np.repeat(g[..., None], 3, 2), 32, 32))


def test_preprocess_image_of_a_path_is_diffusers_load_image_then_preprocess(vae_processor, tmp_path):
    from diffusers.utils import load_image as diffusers_load_image
    path = tmp_path / "p.png"
    _photo(90, 50, mode="RGBA").save(path)
    want = vae_processor.preprocess(diffusers_load_image(str(path)), height=64, width=64).numpy()
    np.testing.assert_array_equal(preprocess_image(path, 64, 64), want)


@pytest.mark.parametrize("src,dst", SIZES)
@pytest.mark.parametrize("shape", ["rectangle", "circle", "blobs", "soft", "feathered"])
def test_preprocess_mask_matches_diffusers_mask_processor(mask_processor, src, dst, shape):
    m = _masks(*src)[shape]
    want = mask_processor.preprocess(m, height=dst[0], width=dst[1]).numpy()
    got = preprocess_mask(m, *dst)
    assert got.dtype == np.float32 and got.shape == (1, 1, *dst)
    assert set(np.unique(got)) <= {0.0, 1.0}
    np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(preprocess_mask(np.asarray(m), *dst), want)
    rgb = m.convert("RGB")   # diffusers' examples load masks as RGB: the same 0/1
    np.testing.assert_array_equal(mask_processor.preprocess(rgb, height=dst[0], width=dst[1]).numpy(), want)
    np.testing.assert_array_equal(preprocess_mask(rgb, *dst), want)
    tinted = Image.merge("RGB", (m, m.point(lambda v: v // 2), m.point(lambda v: 255 - v)))
    tinted_want = mask_processor.preprocess(tinted, height=dst[0], width=dst[1]).numpy()
    if tinted_want.any():
        np.testing.assert_array_equal(preprocess_mask(tinted, *dst), tinted_want)
    else:   # diffusers gives an all-black mask; sdrt refuses it
        with pytest.raises(InvalidInput, match="nothing to repaint"):
            preprocess_mask(tinted, *dst)


def test_mask_threshold_is_half_grey(mask_processor):
    a = np.full((8, 8), 127, np.uint8)
    a[0, 0] = 128
    got = preprocess_mask(a, 8, 8)
    assert got.sum() == 1 and got[0, 0, 0, 0] == 1


@pytest.mark.parametrize("src,dst", SIZES)
def test_float_mask_array_matches_diffusers_numpy_path(mask_processor, src, dst):
    a = np.random.default_rng(4).random((src[1], src[0]))
    a[a > 0.499] = np.maximum(a[a > 0.499], 0.5)   # exact 0.5 values must count as repaint
    want = mask_processor.preprocess(a, height=dst[0], width=dst[1]).numpy().astype(np.float32)
    np.testing.assert_array_equal(preprocess_mask(a, *dst), want)
    np.testing.assert_array_equal(preprocess_mask(a[..., None], *dst), want)


def test_bool_mask_array_is_white_where_true():
    a = np.zeros((16, 16), bool)
    a[4:8, 4:8] = True
    np.testing.assert_array_equal(preprocess_mask(a, 16, 16)[0, 0], a.astype(np.float32))


@pytest.mark.parametrize("src,dst", [((64, 64), (8, 8)), ((96, 64), (12, 8)), ((100, 100), (13, 13)),
                                     ((37, 51), (64, 40)), ((512, 768), (64, 96)), ((64, 64), (128, 128))])
def test_mask_to_latent_matches_torch_interpolate(src, dst):
    import torch
    rng = np.random.default_rng(5)
    m = (rng.random((1, 1, src[0], src[1])) > 0.5).astype(np.float32)
    want = torch.nn.functional.interpolate(torch.from_numpy(m), size=dst).numpy()
    got = mask_to_latent(m, *dst)
    assert got.dtype == np.float32
    np.testing.assert_array_equal(got, want)


def test_masked_image_matches_diffusers_formula(vae_processor, mask_processor):
    import torch
    im, m = _photo(64, 48), _masks(64, 48)["blobs"]
    image_t = vae_processor.preprocess(im, height=48, width=64)
    mask_t = mask_processor.preprocess(m, height=48, width=64)
    want = (image_t * (mask_t < 0.5)).numpy()
    got = masked_image(preprocess_image(im, 48, 64), preprocess_mask(m, 48, 64))
    np.testing.assert_array_equal(got, want)
    assert torch.equal(torch.from_numpy(got), image_t * (mask_t < 0.5))


# --- mask rules ------------------------------------------------------------------------

def test_all_black_mask_is_refused():
    with pytest.raises(InvalidInput, match="nothing to repaint"):
        preprocess_mask(Image.new("L", (32, 32), 0), 32, 32)
    with pytest.raises(InvalidInput, match="nothing to repaint"):   # 127 is below half grey
        preprocess_mask(np.full((32, 32), 127, np.uint8), 32, 32)


def test_all_white_mask_is_accepted():
    assert preprocess_mask(Image.new("L", (32, 32), 255), 16, 16).all()


def test_mask_that_vanishes_at_latent_size_is_refused():
    m = np.zeros((1, 1, 64, 64), np.float32)
    m[..., 3, 3] = 1.0   # between the sampled pixels (0, 8, 16, ...)
    with pytest.raises(InvalidInput, match="vanishes at the latent size 8x8"):
        mask_to_latent(m, 8, 8)


def test_alpha_only_mask_is_refused():
    m = Image.new("RGBA", (32, 32), (255, 255, 255, 0))
    ImageDraw.Draw(m).rectangle((8, 8, 24, 24), fill=(255, 255, 255, 255))
    with pytest.raises(InvalidInput, match="only its alpha channel varies"):
        load_mask(m)
    with pytest.raises(InvalidInput, match="only its alpha channel varies"):
        preprocess_mask(m, 32, 32)


def test_mask_of_another_aspect_ratio_is_refused():
    m = _masks(64, 32)["circle"]
    assert preprocess_mask(m, 32, 32, image_size=(128, 64)).any()   # half size: fine
    with pytest.raises(InvalidInput, match="mask is 64x32 but the image is 64x64"):
        preprocess_mask(m, 32, 32, image_size=(64, 64))


def test_mask_and_image_sizes_must_agree_for_masked_image():
    with pytest.raises(InvalidInput, match="differ in height/width"):
        masked_image(np.zeros((1, 3, 16, 16), np.float32), np.zeros((1, 1, 8, 8), np.float32))


# --- files: every format and mode ------------------------------------------------------

def _diffusers_load(path):
    from diffusers.utils import load_image as diffusers_load_image
    return np.asarray(diffusers_load_image(str(path)))


@pytest.mark.parametrize("mode,ext", [("RGB", "png"), ("RGBA", "png"), ("P", "png"), ("L", "png"),
                                      ("LA", "png"), ("RGB", "webp"), ("RGBA", "webp"),
                                      ("RGB", "jpg"), ("L", "jpg"), ("CMYK", "jpg")])
def test_files_load_as_diffusers_load_image(tmp_path, mode, ext):
    path = tmp_path / f"x-{mode}.{ext}"
    im = _photo(45, 30, mode=mode)
    im.save(path, **({"lossless": True} if ext == "webp" else {}))
    got = load_image(path)
    assert got.mode == "RGB" and got.size == (45, 30)
    np.testing.assert_array_equal(np.asarray(got), _diffusers_load(path))
    np.testing.assert_array_equal(np.asarray(load_image(str(path))), np.asarray(got))
    assert load_mask(path).mode == "L"


def test_unconvertible_mode_is_refused():
    with pytest.raises(InvalidInput, match="image of mode La cannot be converted to RGB"):
        load_image(Image.new("RGBA", (4, 4)).convert("La"))


def test_transparency_is_dropped_like_diffusers(tmp_path):
    # alpha is not composited: the RGB under a transparent pixel is what diffusers sees too
    im = Image.new("RGBA", (4, 4), (200, 10, 10, 0))
    assert np.asarray(load_image(im))[0, 0].tolist() == [200, 10, 10]


def test_sixteen_bit_images_are_scaled_to_eight_bits(tmp_path):
    values = np.array([[0, 257, 1000, 32768, 65535]], dtype=np.uint16)
    want = np.rint(values / 257).astype(np.uint8)[..., None].repeat(3, 2)   # [0, 1, 4, 128, 255]
    path = tmp_path / "deep.png"
    Image.fromarray(values).save(path)
    with Image.open(path) as im:
        assert im.mode == "I;16"     # 16-bit grey PNG (Pillow's convert would clip it)
    np.testing.assert_array_equal(np.asarray(load_image(path)), want)
    np.testing.assert_array_equal(np.asarray(load_mask(path)), want[..., 0])
    np.testing.assert_array_equal(np.asarray(load_image(Image.fromarray(values.astype(np.int32)))), want)
    np.testing.assert_array_equal(np.asarray(load_image(values)), want)   # uint16 arrays alike


def test_jpeg_exif_orientation_is_applied(tmp_path):
    # 40x20, left half red, right half blue; orientation 6 = rotate 90 degrees clockwise
    a = np.zeros((20, 40, 3), np.uint8)
    a[:, :20] = (255, 0, 0)
    a[:, 20:] = (0, 0, 255)
    im = Image.fromarray(a)
    exif = im.getexif()
    exif[0x0112] = 6
    path = tmp_path / "rot.jpg"
    im.save(path, exif=exif.tobytes(), quality=95)
    got = np.asarray(load_image(path)).astype(int)
    assert got.shape == (40, 20, 3)
    # after a clockwise turn the left half (red) is on top, the right half (blue) below
    assert got[5:15, :, 0].mean() > 200 and got[5:15, :, 2].mean() < 50
    assert got[25:35, :, 2].mean() > 200 and got[25:35, :, 0].mean() < 50
    np.testing.assert_array_equal(got, _diffusers_load(path))


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="counts open files in /proc")
def test_loading_closes_the_file_and_prints_no_warning(tmp_path):
    path = tmp_path / "x.png"
    _photo(20, 20).save(path)
    before = len(os.listdir("/proc/self/fd"))
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        for _ in range(5):
            load_image(path)
            load_mask(path)
        import gc
        gc.collect()
    assert len(os.listdir("/proc/self/fd")) == before
    assert seen == []


# --- bad files ---------------------------------------------------------------------------

def _png_with_size(w: int, h: int) -> bytes:
    """A valid 1x1 PNG whose IHDR claims w x h (CRC fixed), as a decompression bomb header."""
    buf = io.BytesIO()
    Image.new("1", (1, 1)).save(buf, "PNG")
    data = bytearray(buf.getvalue())
    ihdr = data[12:29]   # b"IHDR" + 13 bytes of fields
    ihdr[4:12] = struct.pack(">II", w, h)
    data[12:29] = ihdr
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(ihdr)))
    return bytes(data)


@pytest.mark.parametrize("w,h", [(50000, 50000), (10000, 10000), (9000, 9000)])
def test_decompression_bomb_header_is_refused_before_decoding(tmp_path, w, h):
    # 50000^2 is over Pillow's error limit, 10000^2 only over its warning limit,
    # 9000^2 only over sdrt's 64 megapixels: each an InvalidInput, never a warning
    path = tmp_path / "bomb.png"
    path.write_bytes(_png_with_size(w, h))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(InvalidInput, match="bomb.png") as e:
            load_image(path)
    assert f"{w}x{h}" in str(e.value) or f"{w * h} pixels" in str(e.value)   # ours or Pillow's


def test_truncated_png_is_refused(tmp_path):
    path = tmp_path / "cut.png"
    _photo(64, 64).save(path)
    path.write_bytes(path.read_bytes()[:600])
    with pytest.raises(InvalidInput, match="cut.png cannot be decoded: .*truncated"):
        load_image(path)
    path.write_bytes(path.read_bytes()[:20])   # cut inside the header
    with pytest.raises(InvalidInput, match="cut.png (is a damaged or truncated PNG|cannot be decoded: .*[Tt]runcated)"):
        load_image(path)


@pytest.mark.parametrize("content,message", [
    (bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8)), "is not a PNG, JPEG or WebP"),
    (b"a watercolor fox\n", "is a text file"),
    (b"", "is empty"),
    (b"GIF89a" + bytes(100), "is a GIF image; sdrt reads PNG, JPEG or WebP"),
])
def test_non_images_are_refused(tmp_path, content, message):
    path = tmp_path / "x.png"
    path.write_bytes(content)
    with pytest.raises(InvalidInput, match=f"x.png {message}"):
        load_image(path)


def test_real_gif_and_bmp_name_their_format(tmp_path):
    for fmt in ("GIF", "BMP"):
        path = tmp_path / f"x.{fmt.lower()}"
        _photo(8, 8).save(path, fmt)
        with pytest.raises(InvalidInput, match=f"is a {fmt} image"):
            load_image(path)


def test_missing_file_and_folder(tmp_path):
    with pytest.raises(MissingFile, match="image file .*nope.png does not exist"):
        load_image(tmp_path / "nope.png")
    with pytest.raises(MissingFile, match="mask file"):
        load_mask(str(tmp_path / "nope.png"))
    with pytest.raises(InvalidInput, match="is a folder"):
        load_image(tmp_path)


def test_wrong_python_type_is_refused():
    with pytest.raises(InvalidType, match="image must be a file path, encoded image bytes, a PIL image or a NumPy "
                                          "array, not list"):
        load_image([[0, 0]])


def test_encoded_bytes_decode_as_the_file_does(tmp_path):
    # A server receives images as bytes: they go through the same checks as a file.
    path = tmp_path / "in.png"
    Image.fromarray(np.arange(8 * 8 * 3, dtype=np.uint8).reshape(8, 8, 3)).save(path)
    assert np.array_equal(np.asarray(load_image(path.read_bytes())), np.asarray(load_image(path)))
    with pytest.raises(InvalidInput, match="image is a damaged or truncated PNG file"):
        preprocess_image(b"\x89PNG", 8, 8)
    with pytest.raises(InvalidInput, match="image is empty"):
        load_image(b"")
    with pytest.raises(InvalidInput, match="mask is a GIF image"):
        load_mask(b"GIF89a" + bytes(10))


# --- bad arrays ----------------------------------------------------------------------------

@pytest.mark.parametrize("array,message", [
    (np.full((8, 8, 3), np.nan, np.float32), "NaN or infinity"),
    (np.full((8, 8, 3), np.inf), "NaN or infinity"),
    (np.full((8, 8, 3), -0.5, np.float32), "floats from -0.5 to -0.5; expected 0..1"),
    (np.zeros((8, 8, 3), np.int64), "dtype int64"),
    (np.zeros((8, 8, 3), bool), "dtype bool"),
    (np.zeros((3, 8, 8), np.uint8), r"shape \(3, 8, 8\)"),
    (np.zeros((1, 8, 8, 3), np.uint8), r"shape \(1, 8, 8, 3\)"),
    (np.zeros((8, 8, 2), np.uint8), r"shape \(8, 8, 2\)"),
    (np.zeros((0, 8), np.uint8), "0x0|8x0|no pixels"),
])
def test_bad_arrays_are_refused(array, message):
    for call in (lambda: load_image(array), lambda: preprocess_image(array, 8, 8)):
        with pytest.raises(InvalidInput, match=message):
            call()


def test_arrays_over_the_pixel_limit_are_refused_without_copying():
    huge = np.broadcast_to(np.zeros(1, np.uint8), (9000, 9000, 3))   # 243 MB if it were real
    with pytest.raises(InvalidInput, match="9000x9000 = 81,000,000 pixels, over the limit"):
        load_image(huge)
    with pytest.raises(InvalidInput, match="over the limit"):
        preprocess_mask(np.broadcast_to(np.ones(1, np.float32), (9000, 9000)), 64, 64)


@pytest.mark.parametrize("h,w", [(0, 64), (64, -8), (64.0, 64), (True, 64)])
def test_bad_output_size_is_refused(h, w):
    with pytest.raises(InvalidInput, match="must be a positive whole number"):
        preprocess_image(np.zeros((8, 8, 3), np.uint8), h, w)


# --- outpainting ---------------------------------------------------------------------------

def test_outpaint_canvas_size_original_and_mask_coverage():
    im = _photo(60, 40)
    canvas, mask = outpaint_canvas(im, (16, 8, 0, 24), feather=10)
    assert canvas.mode == "RGB" and mask.mode == "L"
    assert canvas.size == mask.size == (76, 72)
    c, m = np.asarray(canvas), np.asarray(mask)
    np.testing.assert_array_equal(c[8:48, 16:76], np.asarray(im))   # original untouched
    new = np.ones(m.shape, bool)
    new[8:48, 16:76] = False
    assert (m[new] == 255).all()
    inner = m[8:48, 16:76]
    assert (inner[10:30, 10:] == 0).all()       # beyond the feather from left, top and bottom
    assert inner[20, -1] == 0                   # no seam on the side without a margin
    assert inner[20, 0] == round(255 * (1 - 0.5 / 10)) and inner[0, 30] == inner[-1, 30] == inner[20, 0]


def test_outpaint_feather_falls_monotonically_from_the_seam():
    canvas, mask = outpaint_canvas(_photo(64, 64), (32, 0, 0, 0), feather=16)
    row = np.asarray(mask)[32, 32:].astype(int)   # from the seam into the original
    assert (np.diff(row) <= 0).all()
    assert row[0] > 240 and row[15] > 0 and (row[16:] == 0).all()
    # preprocess_mask's threshold repaints the new area plus about feather / 2 pixels
    binary = preprocess_mask(mask, 64, 96)[0, 0]
    assert binary[:, :32].all() and binary[:, 32:40].all() and not binary[:, 41:].any()


def test_outpaint_zero_feather_is_a_hard_edge():
    _, mask = outpaint_canvas(_photo(32, 32), (0, 0, 8, 0), feather=0)
    m = np.asarray(mask)
    assert (m[:, 32:] == 255).all() and (m[:, :32] == 0).all()


def test_outpaint_fill_continues_the_edge_colours_deterministically():
    a = np.zeros((32, 32, 3), np.uint8)
    a[:16] = (250, 0, 0)
    a[16:] = (0, 0, 250)
    c1, _ = outpaint_canvas(a, (24, 0, 0, 0))
    c2, _ = outpaint_canvas(a, (24, 0, 0, 0))
    np.testing.assert_array_equal(np.asarray(c1), np.asarray(c2))
    fill = np.asarray(c1)[:, :24].astype(int)
    assert fill[:8, :, 0].mean() > 200 and fill[-8:, :, 2].mean() > 200   # red above, blue below
    assert np.abs(np.diff(fill[12:20, 4], axis=0)).max() < 120            # blurred, no hard step


def test_outpaint_canvas_of_another_aspect_is_refused_with_margins_that_fit():
    im = _photo(64, 64)
    with pytest.raises(InvalidInput, match=r"make a 128x64 canvas, but the model draws 64x64.*margins 64,32,0,32 give"):
        outpaint_canvas(im, (64, 0, 0, 0), 64, 64)
    canvas, _ = outpaint_canvas(im, (64, 32, 0, 32), 64, 64)
    assert canvas.size == (128, 128)
    with pytest.raises(InvalidInput, match=r"make a 64x96 canvas, but the model draws 64x48.*margins 32,0,32,32 give"):
        outpaint_canvas(im, (0, 0, 0, 32), 48, 64)


@pytest.mark.parametrize("margins,message", [
    ((0, 0, 0, 0), "all 0: nothing to outpaint"),
    ((-8, 0, 0, 0), "-8 is not a non-negative"),
    ((8, 0, 0), "must be 4 pixel counts"),
    ((8.0, 0, 0, 0), "8.0 is not"),
    ((True, 0, 0, 0), "True is not"),
    ((20000, 0, 0, 0), "canvas; its sides must be at most 16384"),
    ((9000, 9000, 0, 0), "9016x9016 = 81,288,256 pixels, over the limit"),
])
def test_outpaint_bad_margins_are_refused(margins, message):
    with pytest.raises(InvalidInput, match=message):
        outpaint_canvas(_photo(16, 16), margins)


def test_outpaint_bad_feather_is_refused():
    with pytest.raises(InvalidInput, match="feather 9 must be a whole number of pixels from 0 to 8"):
        outpaint_canvas(_photo(16, 20), (8, 0, 0, 0), feather=9)


@pytest.mark.parametrize("text,want", [("16", (16, 16, 16, 16)), ("8,16", (8, 16, 8, 16)),
                                       ("1,2,3,4", (1, 2, 3, 4)), (" 0, 0 ,128,0 ", (0, 0, 128, 0))])
def test_parse_margins(text, want):
    assert parse_margins(text) == want


@pytest.mark.parametrize("text,message", [
    ("", "'' is not a non-negative"), ("1,2,3", "give N .*, X,Y .* or L,T,R,B"),
    ("a,b", "'a' is not"), ("-1", "'-1' is not"), ("1.5", "'1.5' is not"),
    ("0", "all 0"), ("0,0", "all 0"), ("1,,2,3", "'' is not"), ("99999999999", "is not"),
])
def test_parse_margins_errors_name_the_text(text, message):
    with pytest.raises(InvalidInput, match=message) as e:
        parse_margins(text)
    assert repr(text) in str(e.value)


def test_runtime_module_does_not_import_torch():
    import subprocess
    import sys
    code = ("import sys, sdrt.runtime.inputs; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'diffusers')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
    assert inputs.MAX_PIXELS == 8192 * 8192
