"""core.imageio: every format from bytes and from a path, limits, corrupt input, mask binarisation."""

from __future__ import annotations

import copy
import gzip
import io
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
import tifffile
from PIL import Image
from pydicom.data import get_testdata_file

from core.imageio import (
    ImageDecodeError,
    decode_image,
    decode_mask,
    detect_format,
    encode_mask_png,
    encode_png,
    read_image,
    read_mask,
    to_uint8,
)

RNG = np.random.default_rng(0)
GRAY = RNG.integers(0, 256, (24, 32), dtype=np.uint8)


def _pil_bytes(array: np.ndarray, fmt: str, **kwargs) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format=fmt, **kwargs)
    return buffer.getvalue()


def _tiff_bytes(array: np.ndarray, **kwargs) -> bytes:
    buffer = io.BytesIO()
    tifffile.imwrite(buffer, array, **kwargs)
    return buffer.getvalue()


def _minmax(a: np.ndarray) -> np.ndarray:
    a = a.astype(np.float64)
    return (a - a.min()) / (a.max() - a.min())


def _dicom_bytes(ds: pydicom.Dataset) -> bytes:
    buffer = io.BytesIO()
    ds.save_as(buffer)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def mr_small() -> pydicom.Dataset:
    path = get_testdata_file("MR_small.dcm")
    assert path is not None, "pydicom's bundled MR_small.dcm must be available offline"
    return pydicom.dcmread(path)


# ---------------------------------------------------------------------------------------------- PNG / JPEG


def test_png_gray_from_bytes_and_path_is_exact(tmp_path):
    data = encode_png(GRAY)
    decoded = decode_image(data)
    assert decoded.format == "png" and decoded.spacing_mm is None and decoded.source is None
    assert decoded.pixels.dtype == np.float32 and decoded.shape == (24, 32)
    np.testing.assert_allclose(decoded.pixels, GRAY / 255.0, atol=1e-7)
    path = tmp_path / "image.bin"  # the extension is irrelevant: magic bytes decide
    path.write_bytes(data)
    np.testing.assert_array_equal(read_image(path).pixels, decoded.pixels)


def test_png_16_bit_rgb_rgba_and_palette():
    sixteen = GRAY.astype(np.uint16) * 257
    decoded = decode_image(_pil_bytes(sixteen, "PNG"))
    np.testing.assert_allclose(decoded.pixels, sixteen / 65535.0, atol=1e-6)

    rgb = RNG.integers(0, 256, (10, 12, 3), dtype=np.uint8)
    luminance = rgb @ np.array([0.299, 0.587, 0.114]) / 255.0
    np.testing.assert_allclose(decode_image(encode_png(rgb)).pixels, luminance, atol=1e-6)
    rgba = np.concatenate([rgb, np.zeros((10, 12, 1), np.uint8)], axis=-1)  # alpha is ignored
    np.testing.assert_allclose(decode_image(encode_png(rgba)).pixels, luminance, atol=1e-6)

    palette = Image.fromarray(rgb).convert("P", palette=Image.Palette.ADAPTIVE, colors=8)
    buffer = io.BytesIO()
    palette.save(buffer, format="PNG")
    expanded = np.asarray(palette.convert("RGB")) @ np.array([0.299, 0.587, 0.114]) / 255.0
    np.testing.assert_allclose(decode_image(buffer.getvalue()).pixels, expanded, atol=1e-6)


def test_jpeg_gray_and_colour(tmp_path):
    smooth = np.tile(np.linspace(0, 255, 32, dtype=np.uint8), (24, 1))
    data = _pil_bytes(smooth, "JPEG", quality=95)
    decoded = decode_image(data, name="scan.jpg")
    assert decoded.format == "jpeg"
    assert np.abs(decoded.pixels - smooth / 255.0).mean() < 0.02
    colour = np.stack([smooth, smooth, smooth], axis=-1)
    path = tmp_path / "colour.jpeg"
    path.write_bytes(_pil_bytes(colour, "JPEG", quality=95))
    assert np.abs(read_image(path).pixels - smooth / 255.0).mean() < 0.02


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_truncated_png_and_jpeg_raise(fmt):
    data = _pil_bytes(GRAY, fmt)
    with pytest.raises(ImageDecodeError, match=r"^upload: truncated"):
        decode_image(data[: len(data) // 2])
    with pytest.raises(ImageDecodeError, match=r"^scan: truncated"):
        decode_image(data[:-12], name="scan")  # PNG loses IEND, JPEG its last entropy bytes + EOI


def test_decompression_bomb_is_rejected_from_the_header():
    bomb = encode_png(np.zeros((3000, 3000), np.uint8))  # ~9 KB that would decode to 9 MB
    assert len(bomb) < 50_000
    with pytest.raises(ImageDecodeError, match=r"3000x3000 = 9000000 pixels is over the limit of 1000000"):
        decode_image(bomb, max_pixels=1_000_000)
    # Header-only check: with the data cut away the limit still fires first, not a truncation error.
    with pytest.raises(ImageDecodeError, match="decompression bomb"):
        decode_image(bomb[:200], max_pixels=1_000_000)
    assert decode_image(bomb, max_pixels=9_000_000).shape == (3000, 3000)


def test_byte_limit_from_bytes_and_from_path(tmp_path):
    data = encode_png(GRAY)
    with pytest.raises(ImageDecodeError, match=rf"^upload: {len(data)} bytes, over the limit of 100 bytes"):
        decode_image(data, max_bytes=100)
    path = tmp_path / "big.png"
    path.write_bytes(data)
    with pytest.raises(ImageDecodeError, match=rf"big.png: file is {len(data)} bytes, over the limit"):
        read_image(path, max_bytes=100)
    assert read_image(path, max_bytes=len(data)).shape == (24, 32)


def test_not_an_image_and_unsupported_formats(tmp_path):
    with pytest.raises(ImageDecodeError, match=r"^upload: not an image or an unsupported format"):
        decode_image(b"hello, this is text and not an image at all")
    with pytest.raises(ImageDecodeError, match=r"^upload: unsupported format GIF"):
        decode_image(_pil_bytes(GRAY, "GIF"))
    with pytest.raises(ImageDecodeError, match=r"^upload: empty file"):
        decode_image(b"")
    path = tmp_path / "notes.png"
    path.write_text("not a png")
    with pytest.raises(ImageDecodeError, match=r"notes.png: not an image"):
        read_image(path)
    with pytest.raises(ImageDecodeError, match=r"missing.png: no such file"):
        read_image(tmp_path / "missing.png")
    with pytest.raises(ImageDecodeError, match="corrupt PNG header"):
        decode_image(b"\x89PNG\r\n\x1a\n" + b"\x00" * 40)


def test_constant_and_empty_images_are_fine():
    zeros = decode_image(encode_png(np.zeros((8, 8), np.uint8)))
    assert zeros.pixels.max() == 0.0
    constant_float = decode_image(_tiff_bytes(np.full((8, 8), 3.5, np.float32)))
    np.testing.assert_array_equal(constant_float.pixels, np.zeros((8, 8), np.float32))
    white = decode_image(encode_png(np.full((8, 8), 255, np.uint8)))
    assert white.pixels.min() == 1.0  # fixed-scale data keeps its value


# ---------------------------------------------------------------------------------------------------- TIFF


def test_tiff_dtypes_pages_spacing_and_photometric(tmp_path):
    np.testing.assert_allclose(
        decode_image(_tiff_bytes(GRAY, compression="zlib")).pixels, GRAY / 255.0, atol=1e-7
    )
    wide = GRAY.astype(np.uint16) * 200
    np.testing.assert_allclose(decode_image(_tiff_bytes(wide)).pixels, wide / 65535.0, atol=1e-6)
    floats = RNG.normal(size=(6, 7)).astype(np.float32)
    np.testing.assert_allclose(decode_image(_tiff_bytes(floats)).pixels, _minmax(floats), atol=1e-6)

    stack = np.stack([np.full((5, 6), 10 * k, np.uint8) for k in range(5)])
    path = tmp_path / "stack.tif"
    path.write_bytes(_tiff_bytes(stack))
    assert read_image(path).pixels[0, 0] == pytest.approx(20 / 255)  # middle page by default
    assert read_image(path, slice_index=4).pixels[0, 0] == pytest.approx(40 / 255)
    with pytest.raises(ImageDecodeError, match="slice_index 5 out of range, the image has 5 pages"):
        read_image(path, slice_index=5)

    with_resolution = _tiff_bytes(GRAY, resolution=(20, 40), resolutionunit="CENTIMETER")  # px per cm (x, y)
    assert decode_image(with_resolution).spacing_mm == pytest.approx((0.25, 0.5))
    assert decode_image(_tiff_bytes(GRAY)).spacing_mm is None

    inverted = decode_image(_tiff_bytes(GRAY, photometric="miniswhite"))
    np.testing.assert_allclose(inverted.pixels, 1.0 - GRAY / 255.0, atol=1e-6)


def test_tiff_compression_without_imagecodecs_falls_back_to_pillow():
    lzw = _pil_bytes(GRAY, "TIFF", compression="tiff_lzw")
    decoded = decode_image(lzw)
    assert decoded.format == "tiff"
    np.testing.assert_allclose(decoded.pixels, GRAY / 255.0, atol=1e-7)


def test_tiff_pixel_limit_uses_the_page_shape():
    with pytest.raises(ImageDecodeError, match="TIFF of 32x24 = 768 pixels is over the limit of 500"):
        decode_image(_tiff_bytes(GRAY), max_pixels=500)


# --------------------------------------------------------------------------------------------------- DICOM


def test_real_ct_dicom_applies_rescale_and_keeps_spacing_and_dataset(tmp_path):
    path = get_testdata_file("CT_small.dcm")
    assert path is not None
    ds = pydicom.dcmread(path)
    assert "WindowCenter" not in ds  # so min-max after the modality LUT applies
    decoded = read_image(path)
    assert decoded.format == "dicom" and decoded.shape == (128, 128)
    assert decoded.spacing_mm == pytest.approx((0.661468, 0.661468))
    assert isinstance(decoded.source, pydicom.Dataset)
    assert decoded.source.SOPInstanceUID == ds.SOPInstanceUID
    hounsfield = ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    np.testing.assert_allclose(decoded.pixels, _minmax(hounsfield), atol=1e-6)
    from_bytes = decode_image(Path(path).read_bytes())
    np.testing.assert_array_equal(from_bytes.pixels, decoded.pixels)


def test_real_mr_dicom_applies_the_window(mr_small):
    center, width = float(mr_small.WindowCenter), float(mr_small.WindowWidth)
    assert (center, width) == (600.0, 1600.0)
    decoded = decode_image(_dicom_bytes(mr_small), name="mr.dcm")
    expected = np.clip((mr_small.pixel_array - (center - 0.5)) / (width - 1) + 0.5, 0, 1)
    np.testing.assert_allclose(decoded.pixels, expected, atol=1e-6)
    assert decoded.spacing_mm == pytest.approx((0.3125, 0.3125))


def test_monochrome1_is_inverted(mr_small):
    ds = copy.deepcopy(mr_small)
    ds.PhotometricInterpretation = "MONOCHROME1"
    normal = decode_image(_dicom_bytes(mr_small)).pixels
    inverted = decode_image(_dicom_bytes(ds)).pixels
    np.testing.assert_allclose(inverted, 1.0 - normal, atol=1e-6)


def test_dicom_without_pixel_data_names_the_file(mr_small, tmp_path):
    ds = copy.deepcopy(mr_small)
    del ds.PixelData
    path = tmp_path / "structured-report.dcm"
    path.write_bytes(_dicom_bytes(ds))
    with pytest.raises(
        ImageDecodeError, match=r"structured-report.dcm: DICOM \(Modality MR\) has no pixel data"
    ):
        read_image(path)


def test_dicom_pixel_limit_is_checked_before_pixel_decoding(mr_small, monkeypatch):
    import pydicom.pixels

    def must_not_decode(*args, **kwargs):
        raise AssertionError("pixel data decoded before the size check")

    monkeypatch.setattr(pydicom.pixels, "pixel_array", must_not_decode)
    with pytest.raises(ImageDecodeError, match=r"DICOM of 64x64 = 4096 pixels is over the limit of 4000"):
        decode_image(_dicom_bytes(mr_small), max_pixels=4000)


def test_truncated_dicom_pixel_data(mr_small):
    data = _dicom_bytes(mr_small)
    with pytest.raises(ImageDecodeError, match="cannot decode DICOM pixel data"):
        decode_image(data[:-3000])


# --------------------------------------------------------------------------------------------------- NIfTI


def _nifti(volume: np.ndarray, zooms=(0.5, 0.8, 2.0)) -> bytes:
    affine = np.diag([*zooms[: volume.ndim], 1.0, 1.0][:3] + [1.0])
    image = nib.Nifti1Image(volume, affine)
    image.header.set_zooms(tuple(zooms[: volume.ndim]))
    return image.to_bytes()


def test_nifti_2d_round_trips_with_spacing(tmp_path):
    plane = RNG.random((20, 30)).astype(np.float32)
    decoded = decode_image(_nifti(plane))
    assert decoded.format == "nifti" and decoded.shape == (20, 30)
    np.testing.assert_allclose(decoded.pixels, _minmax(plane), atol=1e-6)
    assert decoded.spacing_mm == pytest.approx((0.5, 0.8))


def test_nifti_3d_middle_or_chosen_slice_plain_and_gzip(tmp_path):
    volume = np.stack([np.full((6, 7), k, np.int16) for k in range(5)], axis=-1)
    volume[0, 0, :] = 100  # give each slice a range so min-max is informative
    raw = _nifti(volume)
    packed = gzip.compress(raw)
    assert detect_format(packed) == "nifti"
    for data in (raw, packed):
        middle = decode_image(data).pixels
        np.testing.assert_allclose(middle, _minmax(volume[:, :, 2]), atol=1e-6)
        chosen = decode_image(data, slice_index=4).pixels
        np.testing.assert_allclose(chosen, _minmax(volume[:, :, 4]), atol=1e-6)
    path = tmp_path / "volume.nii.gz"
    path.write_bytes(packed)
    assert read_image(path, slice_index=1).spacing_mm == pytest.approx((0.5, 0.8))
    with pytest.raises(ImageDecodeError, match="slice_index 5 out of range, the image has 5 slices"):
        read_image(path, slice_index=5)


def test_nifti_limits_and_corruption():
    volume = np.zeros((40, 50, 3), np.uint8)
    with pytest.raises(ImageDecodeError, match="NIFTI of 50x40 = 2000 pixels is over the limit of 1999"):
        decode_image(gzip.compress(_nifti(volume)), max_pixels=1999)
    raw = _nifti(RNG.random((20, 30, 4)).astype(np.float32))
    with pytest.raises(ImageDecodeError, match="truncated or corrupt NIfTI"):
        decode_image(raw[: len(raw) // 2])
    with pytest.raises(ImageDecodeError, match="more than 3 non-singleton axes"):
        decode_image(nib.Nifti1Image(np.zeros((4, 4, 3, 2), np.float32), np.eye(4)).to_bytes())


# ----------------------------------------------------------------------------------------- masks and PNG out


def test_encode_png_and_mask_png_round_trip():
    mask = (GRAY > 128).astype(np.uint8)
    data = encode_mask_png(mask)
    assert np.unique(np.asarray(Image.open(io.BytesIO(data)))).tolist() == [0, 255]
    np.testing.assert_array_equal(decode_mask(data), mask)
    assert encode_png(GRAY) == encode_png(GRAY.copy())  # deterministic bytes
    with pytest.raises(ValueError, match=r"values in \{0, 1\}"):
        encode_mask_png(GRAY)
    with pytest.raises(ValueError, match="uint8"):
        encode_png(GRAY.astype(np.float32))
    np.testing.assert_array_equal(to_uint8(np.array([0.0, 0.5, 1.0, 2.0])), [0, 128, 255, 255])


@pytest.mark.parametrize("shape", [(1, 1), (3, 7), (57, 131)])
def test_encode_mask_png_is_a_plain_8_bit_gray_png(shape):
    mask = (np.random.default_rng(0).random(shape) > 0.5).astype(np.uint8)
    for level in (0, 1, 9):
        data = encode_mask_png(mask, compress_level=level)
        image = Image.open(io.BytesIO(data))
        assert image.mode == "L" and image.size == (shape[1], shape[0])
        np.testing.assert_array_equal(np.asarray(image), mask * 255)
        assert encode_mask_png(mask.astype(bool), compress_level=level) == data  # deterministic, any dtype
    with pytest.raises(ValueError, match="compress_level"):
        encode_mask_png(mask, compress_level=10)
    with pytest.raises(ValueError, match="empty"):
        encode_mask_png(np.zeros((0, 4), np.uint8))


def test_mask_binarisation_rule(tmp_path):
    mask = np.zeros((32, 32), np.uint8)
    mask[8:24, 4:20] = 1
    labels = decode_mask(encode_png(mask))  # {0, 1} label map: foreground is value 1
    np.testing.assert_array_equal(labels, mask)
    path = tmp_path / "mask.png"
    path.write_bytes(encode_png(mask * 255))  # 0/255
    np.testing.assert_array_equal(read_mask(path), mask)
    jpeg = decode_mask(_pil_bytes(mask * 255, "JPEG", quality=90))  # ringing around 0 and 255
    assert np.mean(jpeg != mask) < 0.005
    red = np.zeros((32, 32, 3), np.uint8)
    red[..., 0] = mask * 255  # colour masks: maximum over R, G, B
    np.testing.assert_array_equal(decode_mask(encode_png(red)), mask)
    np.testing.assert_array_equal(decode_mask(_pil_bytes(mask.astype(np.uint16) * 65535, "PNG")), mask)
    probabilities = np.where(mask == 1, 0.7, 0.3).astype(np.float32)
    np.testing.assert_array_equal(decode_mask(_tiff_bytes(probabilities)), mask)
    nifti_labels = decode_mask(_nifti(mask.astype(np.int16)))
    np.testing.assert_array_equal(nifti_labels, mask)
    assert decode_mask(encode_png(np.zeros((4, 4), np.uint8))).sum() == 0  # empty masks are valid


def test_ambiguous_masks_raise():
    multi_label = np.array([[0, 1], [2, 2]], np.uint8)
    with pytest.raises(ImageDecodeError, match=r"^labels.png: ambiguous mask values \(dtype uint8, max 2\)"):
        decode_mask(encode_png(multi_label), name="labels.png")
    with pytest.raises(ImageDecodeError, match="ambiguous mask values"):
        decode_mask(_tiff_bytes(np.array([[0.0, 3.0]], np.float32)))
