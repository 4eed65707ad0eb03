"""Preprocessing: every Pillow mode, EXIF orientation, any size, and every kind of bad bytes.

Images are written through real encoders (PNG, TIFF, JPEG, ...) and read back through the same
entry points the service uses, with expected pixel values derived from what each mode means
(transparent is white, 16-bit is scaled not clipped, ...), not from the code under test.
"""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from app.inputs import prepare_image
from app.preprocessing import (
    CorruptImageError,
    ImageTooLargeError,
    InputSpec,
    UnsupportedImageError,
    decode_image,
    preprocess_bytes,
    to_model_input,
)

W, H = 8, 4  # test images have the model's size, so values are not blurred by resizing
RGB_SPEC = InputSpec(width=W, height=H, color_mode="rgb")
GRAY_SPEC = InputSpec(width=W, height=H, color_mode="grayscale")


def encode(image: Image.Image, fmt: str, **params: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **params)
    return buffer.getvalue()


def pixel(array: np.ndarray, x: int, y: int) -> list[float]:
    return [float(v) for v in array[y, x]]


# --- every image mode --------------------------------------------------------------------------


def test_rgb_png_is_exact() -> None:
    rng = np.random.default_rng(0)
    values = rng.integers(0, 256, size=(H, W, 3), dtype=np.uint8)
    out = preprocess_bytes(encode(Image.fromarray(values, "RGB"), "PNG"), RGB_SPEC)
    assert out.dtype == np.float32
    assert out.shape == (H, W, 3)
    np.testing.assert_array_equal(out, values.astype(np.float32))


def test_grayscale_l_is_replicated_to_three_channels() -> None:
    image = Image.new("L", (W, H), 100)
    out = preprocess_bytes(encode(image, "PNG"), RGB_SPEC)
    assert out.shape == (H, W, 3)
    assert np.all(out == 100.0)


def test_la_transparent_pixels_become_white_opaque_keep_value() -> None:
    image = Image.new("LA", (W, H), (100, 255))
    image.putpixel((0, 0), (100, 0))
    out = preprocess_bytes(encode(image, "PNG"), RGB_SPEC)
    assert pixel(out, 0, 0) == [255.0, 255.0, 255.0]
    assert pixel(out, 1, 0) == [100.0, 100.0, 100.0]


def test_rgba_is_composited_on_white() -> None:
    image = Image.new("RGBA", (W, H), (10, 20, 30, 255))
    image.putpixel((0, 0), (10, 20, 30, 0))
    image.putpixel((1, 0), (0, 0, 0, 128))
    out = preprocess_bytes(encode(image, "PNG"), RGB_SPEC)
    assert pixel(out, 0, 0) == [255.0, 255.0, 255.0]
    assert pixel(out, 2, 0) == [10.0, 20.0, 30.0]
    # half-transparent black over white: about mid grey
    assert all(abs(v - 127) <= 1 for v in pixel(out, 1, 0))


def test_palette_without_transparency_keeps_colours() -> None:
    image = Image.new("P", (W, H), 1)
    image.putpalette([0, 0, 0, 200, 50, 25] + [0] * (256 * 3 - 6))
    out = preprocess_bytes(encode(image, "PNG"), RGB_SPEC)
    assert np.all(out == np.array([200, 50, 25], dtype=np.float32))


def test_palette_with_transparency_index_becomes_white() -> None:
    image = Image.new("P", (W, H), 1)
    image.putpalette([0, 0, 0, 200, 50, 25] + [0] * (256 * 3 - 6))
    image.putpixel((0, 0), 0)
    data = encode(image, "PNG", transparency=0)
    assert "transparency" in Image.open(io.BytesIO(data)).info
    out = preprocess_bytes(data, RGB_SPEC)
    assert pixel(out, 0, 0) == [255.0, 255.0, 255.0]
    assert pixel(out, 1, 0) == [200.0, 50.0, 25.0]


def test_cmyk_tiff_converts_to_rgb() -> None:
    image = Image.new("CMYK", (W, H), (0, 0, 0, 0))
    image.putpixel((0, 0), (0, 0, 0, 255))
    image.putpixel((1, 0), (0, 255, 255, 0))
    out = preprocess_bytes(encode(image, "TIFF"), RGB_SPEC)
    assert pixel(out, 2, 0) == [255.0, 255.0, 255.0]  # no ink: white
    assert pixel(out, 0, 0) == [0.0, 0.0, 0.0]  # full black ink
    assert pixel(out, 1, 0) == [255.0, 0.0, 0.0]  # magenta + yellow: red


def test_cmyk_jpeg_decodes() -> None:
    data = encode(Image.new("CMYK", (W, H), (0, 0, 0, 0)), "JPEG", quality=95)
    assert Image.open(io.BytesIO(data)).mode == "CMYK"
    out = preprocess_bytes(data, RGB_SPEC)
    assert out.shape == (H, W, 3)
    assert np.all(out >= 250)


def test_sixteen_bit_png_is_scaled_not_clipped() -> None:
    values = np.full((H, W), 257 * 100, dtype=np.uint16)
    values[0, 0] = 65535
    values[0, 1] = 0
    image = Image.frombytes("I;16", (W, H), values.astype("<u2").tobytes())
    data = encode(image, "PNG")
    assert Image.open(io.BytesIO(data)).mode.startswith("I")
    out = preprocess_bytes(data, RGB_SPEC)
    assert pixel(out, 0, 0) == [255.0] * 3
    assert pixel(out, 1, 0) == [0.0] * 3
    assert pixel(out, 2, 0) == [100.0] * 3


def test_sixteen_bit_tiff_is_scaled() -> None:
    values = np.full((H, W), 257 * 40, dtype=np.uint16)
    data = encode(Image.frombytes("I;16", (W, H), values.astype("<u2").tobytes()), "TIFF")
    assert Image.open(io.BytesIO(data)).mode.startswith("I;16")
    assert np.all(preprocess_bytes(data, RGB_SPEC) == 40.0)


def test_32bit_integer_is_scaled_and_clipped() -> None:
    values = np.full((H, W), 257 * 50, dtype=np.int32)
    values[0, 0] = -1000
    values[0, 1] = 10_000_000
    data = encode(Image.fromarray(values, "I"), "TIFF")
    assert Image.open(io.BytesIO(data)).mode == "I"
    out = preprocess_bytes(data, RGB_SPEC)
    assert pixel(out, 0, 0) == [0.0] * 3
    assert pixel(out, 1, 0) == [255.0] * 3
    assert pixel(out, 2, 0) == [50.0] * 3


def test_float_image_is_rounded_and_clipped() -> None:
    values = np.full((H, W), 12.4, dtype=np.float32)
    values[0, 0] = -5.0
    values[0, 1] = 300.0
    data = encode(Image.fromarray(values, "F"), "TIFF")
    assert Image.open(io.BytesIO(data)).mode == "F"
    out = preprocess_bytes(data, RGB_SPEC)
    assert pixel(out, 0, 0) == [0.0] * 3
    assert pixel(out, 1, 0) == [255.0] * 3
    assert pixel(out, 2, 0) == [12.0] * 3


def test_bilevel_image_is_black_and_white() -> None:
    image = Image.new("1", (W, H), 1)
    image.putpixel((0, 0), 0)
    out = preprocess_bytes(encode(image, "PNG"), RGB_SPEC)
    assert pixel(out, 0, 0) == [0.0] * 3
    assert pixel(out, 1, 0) == [255.0] * 3


@pytest.mark.parametrize("fmt", ["BMP", "GIF", "WEBP", "TIFF", "JPEG"])
def test_other_container_formats_decode(fmt: str) -> None:
    image = Image.new("RGB", (W, H), (0, 128, 255))
    params: dict[str, object] = {"lossless": True} if fmt == "WEBP" else {}
    out = preprocess_bytes(encode(image, fmt, **params), RGB_SPEC)
    assert out.shape == (H, W, 3)
    assert np.allclose(out.mean(axis=(0, 1)), [0, 128, 255], atol=6)


def test_animated_gif_uses_the_first_frame() -> None:
    frames = [Image.new("P", (W, H), i) for i in (1, 2)]
    palette = [0, 0, 0, 255, 0, 0, 0, 0, 255] + [0] * (256 * 3 - 9)
    for frame in frames:
        frame.putpalette(palette)
    buffer = io.BytesIO()
    frames[0].save(buffer, format="GIF", save_all=True, append_images=frames[1:])
    out = preprocess_bytes(buffer.getvalue(), RGB_SPEC)
    assert pixel(out, 0, 0) == [255.0, 0.0, 0.0]


def test_grayscale_spec_uses_itu_luma_and_one_channel() -> None:
    image = Image.new("RGB", (W, H), (255, 0, 0))
    out = preprocess_bytes(encode(image, "PNG"), GRAY_SPEC)
    assert out.shape == (H, W, 1)
    assert float(out[0, 0, 0]) == 76.0  # 0.299 * 255


def test_grayscale_spec_from_rgba_composites_first() -> None:
    image = Image.new("RGBA", (W, H), (0, 0, 0, 0))
    out = preprocess_bytes(encode(image, "PNG"), GRAY_SPEC)
    assert np.all(out == 255.0)


# --- size -------------------------------------------------------------------------------------


@pytest.mark.parametrize("size", [(1, 1), (2000, 3), (3, 900), (565, 230), (770, 322)])
def test_any_size_is_stretched_to_the_input_size(size: tuple[int, int]) -> None:
    spec = InputSpec(width=384, height=160, color_mode="rgb")
    image = Image.new("RGB", size, (30, 60, 90))
    out = preprocess_bytes(encode(image, "PNG"), spec)
    assert out.shape == (160, 384, 3)
    assert np.all(out == np.array([30, 60, 90], dtype=np.float32))


def test_resize_is_pillow_bilinear_without_crop_or_padding() -> None:
    rng = np.random.default_rng(1)
    values = rng.integers(0, 256, size=(23, 57, 3), dtype=np.uint8)
    image = Image.fromarray(values, "RGB")
    spec = InputSpec(width=40, height=16, color_mode="rgb")
    expected = np.asarray(image.resize((40, 16), Image.Resampling.BILINEAR), dtype=np.float32)
    np.testing.assert_array_equal(preprocess_bytes(encode(image, "PNG"), spec), expected)


# --- EXIF orientation -------------------------------------------------------------------------


def upright_pattern() -> Image.Image:
    """A 6x4 image whose every pixel is distinct, so any flip or rotation is detectable."""
    values = np.arange(6 * 4 * 3, dtype=np.uint8).reshape(4, 6, 3) * 3
    return Image.fromarray(values, "RGB")


# How a camera stores an upright scene for each EXIF orientation (the inverse of what a viewer
# applies): 6 = "rotate 90 CW to view", so the stored pixels are the scene rotated 90 CCW.
STORED_AS = {
    1: None,
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_90,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_270,
}


def with_orientation(orientation: int, fmt: str = "PNG") -> bytes:
    transform = STORED_AS[orientation]
    upright = upright_pattern()
    stored = upright if transform is None else upright.transpose(transform)
    exif = Image.Exif()
    exif[0x0112] = orientation
    return encode(stored, fmt, exif=exif.tobytes())


@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation_is_applied(orientation: int) -> None:
    decoded = decode_image(with_orientation(orientation))
    assert decoded.size == (6, 4)
    np.testing.assert_array_equal(np.asarray(decoded), np.asarray(upright_pattern()))


@pytest.mark.parametrize("orientation", [3, 6, 8])
def test_exif_orientation_in_jpeg(orientation: int) -> None:
    upright = Image.new("RGB", (64, 32), (255, 255, 255))
    upright.paste((255, 0, 0), (0, 0, 16, 16))  # red square top-left when viewed
    transform = STORED_AS[orientation]
    assert transform is not None
    exif = Image.Exif()
    exif[0x0112] = orientation
    data = encode(upright.transpose(transform), "JPEG", quality=95, exif=exif.tobytes())
    decoded = np.asarray(decode_image(data), dtype=np.int16)
    assert decoded.shape == (32, 64, 3)
    assert decoded[4, 4, 0] > 200
    assert decoded[4, 4, 1] < 60  # red
    assert decoded[28, 60].min() > 200  # white


def test_oriented_upload_gives_the_same_model_input_as_upright() -> None:
    spec = InputSpec(width=12, height=8, color_mode="rgb")
    upright = preprocess_bytes(encode(upright_pattern(), "PNG"), spec)
    rotated = preprocess_bytes(with_orientation(6), spec)
    np.testing.assert_array_equal(rotated, upright)


# --- bad bytes --------------------------------------------------------------------------------


def png_header_claiming(width: int, height: int) -> bytes:
    """A PNG whose header claims a huge size (a decompression bomb's first bytes)."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    chunk = b"IHDR" + ihdr
    body = struct.pack(">I", len(ihdr)) + chunk + struct.pack(">I", zlib.crc32(chunk))
    idat = zlib.compress(b"\x00" * 64)
    idat_chunk = b"IDAT" + idat
    body += struct.pack(">I", len(idat)) + idat_chunk + struct.pack(">I", zlib.crc32(idat_chunk))
    return b"\x89PNG\r\n\x1a\n" + body


@pytest.mark.parametrize(
    "data",
    [b"", b"hello world", b"%PDF-1.7\n", b"\x00" * 1000, b'{"json": true}', b"<svg></svg>"],
    ids=["empty", "text", "pdf", "zeros", "json", "svg"],
)
def test_non_images_are_unsupported(data: bytes) -> None:
    with pytest.raises(UnsupportedImageError) as info:
        preprocess_bytes(data, RGB_SPEC)
    assert info.value.code == "unsupported_media_type"


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
def test_truncated_images_are_corrupt(fmt: str) -> None:
    rng = np.random.default_rng(2)
    noise = Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8), "RGB")
    data = encode(noise, fmt)
    with pytest.raises(CorruptImageError) as info:
        preprocess_bytes(data[: len(data) // 2], RGB_SPEC)
    assert info.value.code == "corrupt_image"


def test_damaged_pixel_data_is_corrupt() -> None:
    rng = np.random.default_rng(4)
    noise = Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8), "RGB")
    data = bytearray(encode(noise, "PNG"))
    start = data.index(b"IDAT") + 4
    data[start : start + 64] = b"\x00" * 64
    with pytest.raises(CorruptImageError):
        preprocess_bytes(bytes(data), RGB_SPEC)


@pytest.mark.filterwarnings("ignore:Corrupt EXIF data:UserWarning")
@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "GIF", "TIFF", "BMP", "WEBP"])
def test_broken_header_with_an_image_signature_is_corrupt_not_unsupported(fmt: str) -> None:
    data = bytearray(encode(Image.new("RGB", (W, H)), fmt))
    keep = {"PNG": 12, "JPEG": 3, "GIF": 6, "TIFF": 4, "BMP": 18, "WEBP": 12}[fmt]
    data[keep:] = b"\xff" * (len(data) - keep)
    with pytest.raises(CorruptImageError, match=fmt):
        prepare_image(bytes(data), RGB_SPEC, max_pixels=10**6)


def test_content_without_an_image_signature_stays_unsupported() -> None:
    with pytest.raises(UnsupportedImageError):
        prepare_image(b"RIFF....WAVEfmt not a picture", RGB_SPEC, max_pixels=10**6)


@pytest.mark.parametrize(("width", "height"), [(7000, 7000), (30000, 30000)])
def test_decompression_bombs_are_refused_from_the_header(width: int, height: int) -> None:
    with pytest.raises(ImageTooLargeError) as info:
        decode_image(png_header_claiming(width, height), max_pixels=40_000_000)
    assert info.value.code == "image_too_large"


def test_pixel_limit_is_configurable() -> None:
    data = encode(Image.new("RGB", (100, 100)), "PNG")
    decode_image(data, max_pixels=10_000)
    with pytest.raises(ImageTooLargeError):
        decode_image(data, max_pixels=9_999)


# --- the service's wrapper --------------------------------------------------------------------


def test_prepare_image_matches_preprocess_bytes_bit_for_bit() -> None:
    rng = np.random.default_rng(3)
    image = Image.fromarray(rng.integers(0, 256, (50, 120, 3), dtype=np.uint8), "RGB")
    data = encode(image, "JPEG", quality=90)
    spec = InputSpec(width=48, height=20, color_mode="rgb")
    prepared = prepare_image(data, spec, max_pixels=10**6, keep_image=True)
    np.testing.assert_array_equal(prepared.tensor, preprocess_bytes(data, spec))
    assert (prepared.width, prepared.height) == (120, 50)
    assert prepared.decode_ms > 0
    assert prepared.preprocess_ms > 0
    assert prepared.image is not None
    assert prepared.image.size == (120, 50)
    assert prepare_image(data, spec, max_pixels=10**6).image is None


def test_prepare_image_reports_oriented_size() -> None:
    prepared = prepare_image(with_orientation(6), RGB_SPEC, max_pixels=10**6)
    assert (prepared.width, prepared.height) == (6, 4)


def test_prepare_image_turns_unconvertible_modes_into_unsupported(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import app.inputs

    def refuse(image: Image.Image, spec: InputSpec) -> np.ndarray:
        raise ValueError("conversion not supported")

    monkeypatch.setattr(app.inputs, "to_model_input", refuse)
    with pytest.raises(UnsupportedImageError, match="cannot be converted"):
        prepare_image(encode(Image.new("RGB", (W, H)), "PNG"), RGB_SPEC, max_pixels=10**6)


def test_prepare_image_turns_decoder_crashes_into_corrupt(monkeypatch: pytest.MonkeyPatch) -> None:
    import app.inputs

    def crash(data: bytes, max_pixels: int) -> Image.Image:
        raise IndexError("decoder bug on hostile bytes")

    monkeypatch.setattr(app.inputs, "decode_image", crash)
    with pytest.raises(CorruptImageError, match="IndexError"):
        prepare_image(b"whatever", RGB_SPEC, max_pixels=10**6)


def test_to_model_input_output_is_contiguous_float32() -> None:
    out = to_model_input(Image.new("L", (W, H), 3), GRAY_SPEC)
    assert out.dtype == np.float32
    assert out.flags["C_CONTIGUOUS"]
