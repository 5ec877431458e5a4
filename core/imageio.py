"""Decode PNG, JPEG, TIFF, DICOM and NIfTI images, from a path or bytes, into ``DecodedImage`` (``pixels``
``(H, W) float32 in [0, 1]``); formats, limits and errors in docs/architecture.md ("core").
"""

from __future__ import annotations

import gzip
import io
import os
import struct
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from core.errors import InputError, InputTooLarge, UnsupportedInput

FORMATS = ("png", "jpeg", "tiff", "dicom", "nifti")
VOLUME_SLICE_LIMIT = 1024  # a volume may hold max_pixels * VOLUME_SLICE_LIMIT voxels
LUMA_WEIGHTS = (0.299, 0.587, 0.114)
INFLATE_BYTES_PER_PIXEL = 8  # one plane of the widest sample (float64; RGB 16-bit needs 6)
INFLATE_HEADROOM_BYTES = 64 * 2**20  # headers and metadata when no max_bytes is given
_INFLATE_CHUNK = 1 << 20  # bytes of inflated output held at once while streaming
_INFLATE_FEED = 1 << 16  # compressed bytes handed to zlib per call (keeps unconsumed_tail copies small)
_DICOM_HEAD_BYTES = 1 << 20  # inflated bytes searched for the DICOM pixel description
_DEFLATED_DICOM = "1.2.840.10008.1.2.1.99"  # Deflated Explicit VR Little Endian

_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
_JPEG_MAGIC = b"\xff\xd8\xff"
_TIFF_MAGICS = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")
_GZIP_MAGIC = b"\x1f\x8b"
_NIFTI_HEADER_BYTES = 544  # NIfTI-2 header (540) + extension flag
# Formats we recognise only to name them in the error message.
_OTHER_MAGICS = (
    (b"GIF8", "GIF"),
    (b"BM", "BMP"),
    (b"%PDF", "PDF"),
    (b"PK\x03\x04", "ZIP archive"),
    (b"RIFF", "RIFF/WebP"),
    (b"\x00\x00\x00\x0cjP  ", "JPEG 2000"),
)


class ImageDecodeError(InputError):
    """An image could not be decoded; the message names the file (or ``"upload"``) and the reason.

    ``field`` is the request field the bytes came in (``"file"`` unless the caller says otherwise).
    """

    def __init__(self, message: str, field: str | None = "file") -> None:
        super().__init__(message, field)


class ImageTooLargeError(ImageDecodeError, InputTooLarge):
    """Over a size limit (bytes, pixels, voxels or the inflate budget); the message says "over the limit"."""


class UnsupportedImageFormat(ImageDecodeError, UnsupportedInput):
    """Not one of :data:`FORMATS` (a GIF, a PDF, or no image at all)."""


@dataclass(frozen=True, eq=False)
class DecodedImage:
    """One decoded 2-D image.

    Attributes:
        pixels: ``(H, W) float32 in [0, 1]``, grayscale (colour converted to luminance).
        spacing_mm: ``(row, col)`` pixel spacing in millimetres, or ``None`` when the file has none
            (DICOM PixelSpacing, NIfTI header zooms, TIFF resolution in pixels per centimetre).
        format: one of :data:`FORMATS`.
        source: the original ``pydicom.Dataset`` for DICOM (kept for DICOM-SEG output), else ``None``.
    """

    pixels: np.ndarray
    spacing_mm: tuple[float, float] | None
    format: str
    source: Any = None

    @property
    def shape(self) -> tuple[int, int]:
        """``(H, W)`` of ``pixels``."""
        return (int(self.pixels.shape[0]), int(self.pixels.shape[1]))


@dataclass
class _Plane:
    """Stored values of one plane before the mapping to [0, 1] (internal)."""

    values: np.ndarray  # (H, W) or (H, W, C) colour, stored dtype (DICOM: after the modality LUT)
    spacing_mm: tuple[float, float] | None
    format: str
    source: Any = None
    full_scale: float | None = None  # divide by this; None: window or min-max
    window: tuple[float, float, str] | None = None  # DICOM (center, width, VOILUTFunction)
    invert: bool = False  # MONOCHROME1 / MINISWHITE


# ----------------------------------------------------------------------------------------------------------
# Public API
# ----------------------------------------------------------------------------------------------------------


def detect_format(data: bytes) -> str | None:
    """Return the format of encoded ``data`` from its magic bytes: one of :data:`FORMATS`, or ``None``.

    DICOM needs the Part-10 preamble (``DICM`` at byte 128); NIfTI is recognised by ``sizeof_hdr`` and the
    ``n+1``/``n+2`` magic, plain or gzip-compressed (the gzip stream is opened to look at the header).
    """
    if len(data) >= 132 and data[128:132] == b"DICM":
        return "dicom"  # first: a DICOM preamble may itself hold a TIFF header (dual-personality files)
    if data.startswith(_PNG_MAGIC):
        return "png"
    if data.startswith(_JPEG_MAGIC):
        return "jpeg"
    if data[:4] in _TIFF_MAGICS:
        return "tiff"
    if _nifti_version(data) is not None:
        return "nifti"
    if data.startswith(_GZIP_MAGIC):
        try:
            head = _gunzip_head(data)
        except (OSError, EOFError, zlib.error):
            return None
        if _nifti_version(head) is not None:
            return "nifti"
    return None


def inflate_budget(max_pixels: int | None, max_bytes: int | None) -> int | None:
    """Most bytes a compressed container (deflated DICOM, ``.nii.gz``) may inflate to, or None (no limit).

    One plane of ``max_pixels`` samples of :data:`INFLATE_BYTES_PER_PIXEL` bytes plus ``max_bytes`` of
    headroom (as much metadata, or as many leading planes, as an uncompressed upload could hold);
    :data:`INFLATE_HEADROOM_BYTES` when ``max_bytes`` is None. At the service defaults (40 000 000 pixels,
    20 MiB) that is 340 971 520 bytes (325 MiB). Without ``max_pixels`` there is no budget.
    """
    if max_pixels is None:
        return None
    headroom = INFLATE_HEADROOM_BYTES if max_bytes is None else int(max_bytes)
    return INFLATE_BYTES_PER_PIXEL * int(max_pixels) + headroom


def decode_image(
    data: bytes,
    *,
    name: str = "upload",
    max_pixels: int | None = None,
    max_bytes: int | None = None,
    slice_index: int | None = None,
) -> DecodedImage:
    """Decode encoded image bytes (PNG, JPEG, TIFF, DICOM, NIfTI incl. ``.nii.gz``) found by magic bytes.

    Args:
        data: the encoded file content.
        name: how error messages call the input (a file name, or ``"upload"``).
        max_pixels: largest allowed ``H * W`` of the plane, checked before pixel data is decoded.
        max_bytes: largest allowed ``len(data)``.
        slice_index: plane of a volume (NIfTI axis 2, DICOM frame, TIFF page); default the middle one.

    Returns:
        :class:`DecodedImage` with ``pixels (H, W) float32 in [0, 1]``.

    Raises:
        ImageDecodeError: not an image or an unsupported format, truncated or corrupt data, over
            ``max_pixels`` (bomb) or ``max_bytes``, DICOM without pixel data, bad ``slice_index``.
    """
    plane = _decode_plane(data, name, max_pixels, max_bytes, slice_index)
    return DecodedImage(_to_unit(plane), plane.spacing_mm, plane.format, plane.source)


def read_image(
    path: str | os.PathLike[str],
    *,
    max_pixels: int | None = None,
    max_bytes: int | None = None,
    slice_index: int | None = None,
) -> DecodedImage:
    """Read and decode an image file; see :func:`decode_image`. The format comes from the content."""
    data = _read_bytes(path, max_bytes)
    return decode_image(
        data, name=str(path), max_pixels=max_pixels, max_bytes=max_bytes, slice_index=slice_index
    )


def decode_mask(
    data: bytes,
    *,
    name: str = "upload",
    max_pixels: int | None = None,
    max_bytes: int | None = None,
    slice_index: int | None = None,
) -> np.ndarray:
    """Decode an encoded binary mask into ``(H, W) uint8 in {0, 1}``.

    Binarisation rule: let ``v`` be the stored pixel values (for colour masks the maximum over the R, G, B
    channels; alpha is ignored; palette images are expanded to RGB first; no rescaling, windowing or
    inversion is applied).

    * If ``max(v) <= 1`` (``{0, 1}`` label maps, boolean or probability maps): foreground is ``v > 0.5``,
      i.e. ``v == 1`` for integer data.
    * Otherwise, unsigned 8-bit data: foreground is ``v > 127``; unsigned 16-bit data: ``v > 32767``
      (0/255 and 0/65535 masks, tolerant of JPEG ringing).
    * Anything else is ambiguous and raises: 8-bit data whose maximum is 2..127, 16-bit data whose maximum
      is 2..32767 (multi-label maps such as ``{0, 1, 2}``), floats above 1, other integer dtypes above 1.

    An all-zero mask is valid and decodes to zeros.

    Raises:
        ImageDecodeError: as :func:`decode_image`, or ambiguous mask values.
    """
    plane = _decode_plane(data, name, max_pixels, max_bytes, slice_index)
    return _binarise(plane, name)


def read_mask(
    path: str | os.PathLike[str],
    *,
    max_pixels: int | None = None,
    max_bytes: int | None = None,
    slice_index: int | None = None,
) -> np.ndarray:
    """Read a mask file into ``(H, W) uint8 in {0, 1}`` with the rule documented in :func:`decode_mask`."""
    data = _read_bytes(path, max_bytes)
    return decode_mask(
        data, name=str(path), max_pixels=max_pixels, max_bytes=max_bytes, slice_index=slice_index
    )


def encode_png(pixels: np.ndarray) -> bytes:
    """Encode ``(H, W)`` gray, ``(H, W, 3)`` RGB or ``(H, W, 4)`` RGBA ``uint8`` pixels as PNG, verbatim.

    A boolean ``(H, W)`` array is written as 0/255. The output is byte-identical for identical input.

    Raises:
        ValueError: wrong dtype or shape (named in the message).
    """
    array = np.asarray(pixels)
    if array.dtype == np.bool_ and array.ndim == 2:
        array = array.astype(np.uint8) * 255
    if array.dtype != np.uint8:
        raise ValueError(f"encode_png expects uint8 (or bool) pixels, got dtype {array.dtype}")
    if not (array.ndim == 2 or (array.ndim == 3 and array.shape[2] in (3, 4))):
        raise ValueError(f"encode_png expects shape (H, W), (H, W, 3) or (H, W, 4), got {array.shape}")
    if array.shape[0] == 0 or array.shape[1] == 0:
        raise ValueError(f"encode_png got an empty image of shape {array.shape}")
    buffer = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(array)).save(buffer, format="PNG")
    return buffer.getvalue()


def encode_mask_png(mask: np.ndarray, *, compress_level: int = 1) -> bytes:
    """Encode a binary mask ``(H, W)`` with values in ``{0, 1}`` (any integer or bool dtype) as a 0/255 PNG.

    An 8-bit gray PNG written directly with zlib: no row filters (they do not help two-level images) and
    zlib level ``compress_level`` (0-9). At level 1 a 256 x 256 lesion mask takes ~0.1 ms and ~0.8 KB,
    against ~0.45 ms and ~0.55 KB through Pillow's defaults (its adaptive filters, level 6). The output is
    byte-identical for identical input.

    Raises:
        ValueError: values other than 0 and 1, not 2-D, empty, or a compress_level outside 0-9.
    """
    array = np.asarray(mask)
    if array.ndim != 2:
        raise ValueError(f"encode_mask_png expects a (H, W) mask, got shape {array.shape}")
    if array.shape[0] == 0 or array.shape[1] == 0:
        raise ValueError(f"encode_mask_png got an empty mask of shape {array.shape}")
    if array.dtype != np.bool_ and np.any((array != 0) & (array != 1)):
        raise ValueError(f"encode_mask_png expects values in {{0, 1}}, got {np.unique(array)[:8].tolist()}")
    if not 0 <= compress_level <= 9:
        raise ValueError(f"encode_mask_png compress_level must be in 0..9, got {compress_level}")
    height, width = array.shape
    rows = np.zeros((height, width + 1), np.uint8)  # each scanline: filter type 0 (None), then its pixels
    rows[:, 1:] = array.astype(bool)
    rows[:, 1:] *= 255
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)  # 8-bit gray, no interlace
    return b"".join((
        _PNG_MAGIC,
        _png_chunk(b"IHDR", header),
        _png_chunk(b"IDAT", zlib.compress(rows.tobytes(), compress_level)),
        _png_chunk(b"IEND", b""),
    ))


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    """One PNG chunk: length, type, data, CRC-32 of type + data."""
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(data, zlib.crc32(kind)))


def to_uint8(pixels: np.ndarray) -> np.ndarray:
    """Map ``float in [0, 1]`` pixels (any shape) to ``uint8`` by ``round(255 * clip(x, 0, 1))``."""
    return np.round(np.clip(np.asarray(pixels, np.float32), 0.0, 1.0) * 255.0).astype(np.uint8)


# ----------------------------------------------------------------------------------------------------------
# Dispatch and limits
# ----------------------------------------------------------------------------------------------------------


def _read_bytes(path: str | os.PathLike[str], max_bytes: int | None) -> bytes:
    try:
        size = os.stat(path).st_size
        if max_bytes is not None and size > max_bytes:
            raise ImageTooLargeError(f"{path}: file is {size} bytes, over the limit of {max_bytes} bytes")
        return Path(path).read_bytes()
    except FileNotFoundError as exc:
        raise ImageDecodeError(f"{path}: no such file") from exc
    except IsADirectoryError as exc:
        raise ImageDecodeError(f"{path}: is a directory, not an image file") from exc
    except OSError as exc:
        raise ImageDecodeError(f"{path}: cannot read file ({exc})") from exc


def _decode_plane(
    data: bytes, name: str, max_pixels: int | None, max_bytes: int | None, slice_index: int | None
) -> _Plane:
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise ImageDecodeError(f"{name}: expected encoded bytes, got {type(data).__name__}")
    data = bytes(data)
    if max_bytes is not None and len(data) > max_bytes:
        raise ImageTooLargeError(f"{name}: {len(data)} bytes, over the limit of {max_bytes} bytes")
    if len(data) == 0:
        raise ImageDecodeError(f"{name}: empty file, not an image")
    if slice_index is not None and slice_index < 0:
        raise ImageDecodeError(f"{name}: slice_index must be >= 0, got {slice_index}")
    fmt = detect_format(data)
    if fmt is None:
        other = next((label for magic, label in _OTHER_MAGICS if data.startswith(magic)), None)
        what = f"unsupported format {other}" if other else "not an image or an unsupported format"
        raise UnsupportedImageFormat(f"{name}: {what} (supported: PNG, JPEG, TIFF, DICOM with preamble, NIfTI)")
    decoder = {
        "png": _decode_pil,
        "jpeg": _decode_pil,
        "tiff": _decode_tiff,
        "dicom": _decode_dicom,
        "nifti": _decode_nifti,
    }[fmt]
    # Pillow and tifffile inflate no more than the header's shape, which is checked against max_pixels
    # first; only the DICOM and NIfTI containers can hide more, and they get the inflate budget.
    plane = decoder(data, name, fmt, max_pixels, slice_index, inflate_budget(max_pixels, max_bytes))
    if plane.values.shape[0] == 0 or plane.values.shape[1] == 0:
        raise ImageDecodeError(f"{name}: image has no pixels (shape {plane.values.shape})")
    return plane


def _check_plane(name: str, fmt: str, height: int, width: int, max_pixels: int | None) -> None:
    if max_pixels is not None and height * width > max_pixels:
        raise ImageTooLargeError(
            f"{name}: {fmt.upper()} of {width}x{height} = {height * width} pixels is over the limit of "
            f"{max_pixels} pixels (decompression bomb protection)"
        )


def _check_volume(name: str, fmt: str, voxels: int, max_pixels: int | None) -> None:
    if max_pixels is not None and voxels > max_pixels * VOLUME_SLICE_LIMIT:
        raise ImageTooLargeError(
            f"{name}: {fmt.upper()} volume of {voxels} voxels is over the limit of "
            f"{max_pixels} x {VOLUME_SLICE_LIMIT} voxels"
        )


def _inflate(data: bytes | memoryview, wbits: int) -> Iterator[bytes]:
    """Inflate a deflate stream lazily, at most ``_INFLATE_CHUNK`` bytes per item.

    ``wbits``: ``-15`` raw deflate (DICOM), ``31`` gzip (concatenated members are read one after another,
    as ``gzip`` does). The caller counts what it gets and stops when it has enough, so a bomb costs the
    CPU of the bytes the caller accepted and the memory of one chunk. Bytes after the last member are
    ignored. Raises ``EOFError`` when the stream ends early, ``zlib.error`` when it is corrupt.
    """
    view, pos = memoryview(data), 0
    inflater = zlib.decompressobj(wbits)
    while True:
        if inflater.unconsumed_tail:
            feed = inflater.unconsumed_tail
        else:
            feed = view[pos:pos + _INFLATE_FEED]
            pos += len(feed)
        out = inflater.decompress(feed, _INFLATE_CHUNK)
        if out:
            yield out
        if inflater.eof:
            rest = inflater.unused_data + bytes(view[pos:])
            if wbits <= 0 or not rest.startswith(_GZIP_MAGIC):
                return
            view, pos = memoryview(rest), 0
            inflater = zlib.decompressobj(wbits)
        elif not out and not feed:
            raise EOFError("compressed stream ended before its end marker")


def _pick_slice(name: str, count: int, slice_index: int | None, what: str) -> int:
    if slice_index is None:
        return count // 2
    if slice_index >= count:
        raise ImageDecodeError(
            f"{name}: slice_index {slice_index} out of range, the image has {count} {what}"
        )
    return slice_index


# ----------------------------------------------------------------------------------------------------------
# PNG / JPEG (Pillow)
# ----------------------------------------------------------------------------------------------------------

_PIL_FORMAT = {"png": "PNG", "jpeg": "JPEG", "tiff": "TIFF"}


def _decode_pil(
    data: bytes, name: str, fmt: str, max_pixels: int | None, slice_index: int | None,
    budget: int | None = None,
) -> _Plane:
    try:
        image = Image.open(io.BytesIO(data), formats=[_PIL_FORMAT[fmt]])  # lazy: reads the header only
    except Image.DecompressionBombError as exc:
        raise ImageTooLargeError(f"{name}: {fmt.upper()} rejected as a decompression bomb ({exc})") from exc
    except Exception as exc:  # Pillow raises many types for corrupt headers
        raise ImageDecodeError(f"{name}: corrupt {fmt.upper()} header ({exc})") from exc
    with image:
        frames = getattr(image, "n_frames", 1)
        index = _pick_slice(name, frames, slice_index, "pages") if fmt == "tiff" else 0
        if fmt != "tiff" and slice_index not in (None, 0):
            raise ImageDecodeError(f"{name}: slice_index {slice_index} given for a 2-D {fmt.upper()} image")
        try:
            if index:
                image.seek(index)
        except (EOFError, OSError, ValueError) as exc:
            raise ImageDecodeError(f"{name}: cannot seek to page {index} ({exc})") from exc
        width, height = image.size
        _check_plane(name, fmt, height, width, max_pixels)
        try:
            image.load()  # full decode; LOAD_TRUNCATED_IMAGES stays False so truncation raises
        except Exception as exc:  # OSError, SyntaxError, zlib.error, EOFError...
            raise ImageDecodeError(f"{name}: truncated or corrupt {fmt.upper()} data ({exc})") from exc
        if fmt == "png" and b"IEND" not in data[-4096:]:
            raise ImageDecodeError(f"{name}: truncated PNG data (no IEND chunk at the end)")
        return _pil_plane(image, fmt)


def _pil_plane(image: Image.Image, fmt: str) -> _Plane:
    mode = image.mode
    if mode in ("1", "L", "LA", "La"):
        return _Plane(np.asarray(image.convert("L")), None, fmt, full_scale=255.0)
    if mode.startswith("I;16"):
        return _Plane(np.asarray(image).astype(np.uint16), None, fmt, full_scale=65535.0)
    if mode == "I" and fmt == "png":  # 16-bit grey PNG as older Pillow versions open it
        return _Plane(np.asarray(image).astype(np.uint16), None, fmt, full_scale=65535.0)
    if mode in ("I", "F"):
        return _Plane(np.asarray(image), None, fmt, full_scale=None)
    return _Plane(np.asarray(image.convert("RGB")), None, fmt, full_scale=255.0)


# ----------------------------------------------------------------------------------------------------------
# TIFF (tifffile, Pillow for compressions tifffile cannot decode without imagecodecs, e.g. LZW, JPEG)
# ----------------------------------------------------------------------------------------------------------


def _decode_tiff(
    data: bytes, name: str, fmt: str, max_pixels: int | None, slice_index: int | None,
    budget: int | None = None,
) -> _Plane:
    import tifffile

    try:
        with tifffile.TiffFile(io.BytesIO(data)) as tif:
            count = len(tif.pages)
            if count == 0:
                raise ImageDecodeError(f"{name}: TIFF has no pages")
            index = _pick_slice(name, count, slice_index, "pages")
            page = tif.pages[index]
            meta = page.keyframe
            axes, shape = meta.axes, meta.shape
            if "Y" not in axes or "X" not in axes:
                raise ImageDecodeError(f"{name}: TIFF page with axes {axes!r} has no Y/X plane")
            height, width = shape[axes.index("Y")], shape[axes.index("X")]
            _check_plane(name, fmt, height, width, max_pixels)
            if "Z" in axes and shape[axes.index("Z")] > 1:
                raise ImageDecodeError(f"{name}: volumetric TIFF pages (axes {axes!r}) are not supported")
            spacing = _tiff_spacing(meta)
            photometric = int(meta.photometric)
            colormap = meta.colormap
            try:
                values = page.asarray()
            except (ValueError, KeyError) as exc:
                if "imagecodecs" not in str(exc):
                    raise
                plane = _decode_pil(data, name, "tiff", max_pixels, index)  # e.g. LZW or JPEG compression
                plane.spacing_mm = spacing
                return plane
    except ImageDecodeError:
        raise
    except Exception as exc:  # tifffile raises many types for corrupt files
        raise ImageDecodeError(f"{name}: truncated or corrupt TIFF data ({exc})") from exc
    # Arrange as (H, W) or (H, W, S).
    if "S" in axes and axes.index("S") < axes.index("Y"):
        values = np.moveaxis(values, axes.index("S"), -1)
    values = values.reshape(height, width, -1)
    if photometric == 3 and colormap is not None:  # PALETTE: expand to RGB in [0, 65535]
        values = np.moveaxis(np.asarray(colormap)[:, values[..., 0]], 0, -1)
    if values.shape[2] >= 3 and photometric in (2, 3, 6):  # RGB, PALETTE, YCbCr (decoded to RGB)
        values = values[..., :3]
    else:
        values = values[..., 0]
    full_scale = {np.dtype(np.uint8): 255.0, np.dtype(np.uint16): 65535.0, np.dtype(np.bool_): 1.0}.get(
        values.dtype
    )
    if values.dtype == np.bool_:
        values = values.astype(np.uint8)
    return _Plane(values, spacing, fmt, full_scale=full_scale, invert=photometric == 0)


def _tiff_spacing(page: Any) -> tuple[float, float] | None:
    """Pixel spacing in mm when the resolution unit is centimetre (TIFF ResolutionUnit 3), else None."""
    tags = page.tags
    unit = tags.get("ResolutionUnit")
    if unit is None or int(unit.value) != 3 or "XResolution" not in tags or "YResolution" not in tags:
        return None
    try:
        x_num, x_den = tags["XResolution"].value
        y_num, y_den = tags["YResolution"].value
        x_res, y_res = x_num / x_den, y_num / y_den  # pixels per centimetre
    except (TypeError, ValueError, ZeroDivisionError):
        return None
    if x_res <= 0 or y_res <= 0:
        return None
    return (10.0 / y_res, 10.0 / x_res)


# ----------------------------------------------------------------------------------------------------------
# DICOM (pydicom 3)
# ----------------------------------------------------------------------------------------------------------

_PIXEL_DATA_KEYWORDS = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")


def _decode_dicom(
    data: bytes, name: str, fmt: str, max_pixels: int | None, slice_index: int | None, budget: int | None
) -> _Plane:
    import pydicom
    from pydicom.pixels import apply_modality_lut, pixel_array

    _check_deflated_dicom(data, name, max_pixels, budget)  # before pydicom inflates it whole
    try:
        ds = pydicom.dcmread(io.BytesIO(data))
    except Exception as exc:  # InvalidDicomError, EOFError, struct errors...
        raise ImageDecodeError(f"{name}: truncated or corrupt DICOM ({exc})") from exc
    if not any(keyword in ds for keyword in _PIXEL_DATA_KEYWORDS):
        modality = ds.get("Modality", "?")
        raise ImageDecodeError(f"{name}: DICOM (Modality {modality}) has no pixel data")
    rows, columns, frames, samples, _ = _dicom_pixel_description(ds, name, max_pixels)
    index = _pick_slice(name, frames, slice_index, "frames")
    try:
        values = pixel_array(ds, index=index if frames > 1 else None)
    except Exception as exc:  # missing decoder plugins, truncated pixel data...
        syntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", "?")
        raise ImageDecodeError(
            f"{name}: cannot decode DICOM pixel data (transfer syntax {syntax}): {exc}"
        ) from exc
    if values.ndim == 3 and values.shape[-1] != samples:
        values = values[0]  # defensive: a single-frame result with a leading frame axis
    spacing = _dicom_spacing(ds)
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).upper()
    if samples >= 3:
        bits = int(ds.get("BitsStored", ds.get("BitsAllocated", 8)))
        return _Plane(values[..., :3], spacing, fmt, ds, full_scale=float(2**bits - 1))
    values = np.asarray(apply_modality_lut(values, ds), np.float64)
    return _Plane(values, spacing, fmt, ds, window=_dicom_window(ds), invert=photometric == "MONOCHROME1")


def _dicom_pixel_description(ds: Any, name: str, max_pixels: int | None) -> tuple[int, int, int, int, int]:
    """``(rows, columns, frames, samples, bits_allocated)`` of a dataset's header, checked against the limits.

    Raises:
        ImageDecodeError: a missing or malformed value, BitsAllocated not 1, 8, 16, 32 or 64.
        ImageTooLargeError: a plane over ``max_pixels`` or a volume over ``max_pixels * VOLUME_SLICE_LIMIT``.
    """
    try:
        rows, columns = int(ds.Rows), int(ds.Columns)
        frames = int(ds.get("NumberOfFrames", 1) or 1)
        samples = int(ds.get("SamplesPerPixel", 1) or 1)
        bits = int(ds.get("BitsAllocated", 0) or 0)
    except (AttributeError, TypeError, ValueError) as exc:
        raise ImageDecodeError(f"{name}: DICOM pixel description is incomplete ({exc})") from exc
    if min(rows, columns, frames, samples) < 1:
        raise ImageDecodeError(
            f"{name}: DICOM Rows {rows}, Columns {columns}, NumberOfFrames {frames} and SamplesPerPixel "
            f"{samples} must all be at least 1"
        )
    _check_plane(name, "dicom", rows, columns, max_pixels)
    _check_volume(name, "dicom", rows * columns * frames * samples, max_pixels)
    if bits not in (1, 8, 16, 32, 64):
        raise ImageDecodeError(f"{name}: DICOM BitsAllocated {bits} is not one of 1, 8, 16, 32, 64")
    return rows, columns, frames, samples, bits


def _check_deflated_dicom(data: bytes, name: str, max_pixels: int | None, budget: int | None) -> None:
    """Refuse a Deflated Explicit VR Little Endian DICOM that would inflate past its limit; else no-op.

    The limit is the declared pixel data (Rows x Columns x NumberOfFrames x SamplesPerPixel x
    BitsAllocated / 8, read from the first ``_DICOM_HEAD_BYTES`` inflated bytes and checked against
    ``max_pixels`` there) plus the budget's headroom, at most ``budget``; without a readable header only
    ``budget``. The stream is inflated chunk by chunk and counted, keeping only its head, so a refused
    bomb costs about one chunk of memory; pydicom inflates an accepted one again, within the limit.
    """
    from pydicom.filereader import _read_file_meta_info, read_preamble

    if budget is None or max_pixels is None:
        return
    stream = io.BytesIO(data)
    try:
        read_preamble(stream, False)
        meta = _read_file_meta_info(stream)  # private, but pydicom's own parse decides the transfer syntax
        syntax = str(meta.get("TransferSyntaxUID", ""))
    except Exception:  # pydicom reports a broken file meta itself, without inflating anything
        return
    if syntax != _DEFLATED_DICOM:
        return
    headroom = budget - INFLATE_BYTES_PER_PIXEL * max_pixels  # what inflate_budget added to one plane
    limit, head, total, described = budget, bytearray(), 0, False
    try:
        for chunk in _inflate(memoryview(data)[stream.tell():], -zlib.MAX_WBITS):
            total += len(chunk)
            if len(head) < _DICOM_HEAD_BYTES:
                head += chunk[:_DICOM_HEAD_BYTES - len(head)]
            if not described and len(head) >= _DICOM_HEAD_BYTES:
                described = True
                declared = _declared_pixel_bytes(bytes(head), name, max_pixels)
                if declared is not None:
                    limit = min(limit, declared + headroom)
            if total > limit:
                raise ImageTooLargeError(
                    f"{name}: deflated DICOM inflates to more than {limit} bytes, over the limit of {limit} "
                    f"bytes (its declared pixel data plus {headroom} bytes, at most {budget}; "
                    "decompression bomb protection)"
                )
    except (EOFError, zlib.error) as exc:
        raise ImageDecodeError(f"{name}: truncated or corrupt deflated DICOM ({exc})") from exc


def _declared_pixel_bytes(head: bytes, name: str, max_pixels: int | None) -> int | None:
    """Bytes of pixel data an inflated dataset head declares, or None when the head does not reach it.

    Raises the header's limit errors (see :func:`_dicom_pixel_description`), so an oversized plane is
    refused before the rest of the stream is inflated.
    """
    from pydicom.filebase import DicomBytesIO
    from pydicom.filereader import read_dataset

    reached = []

    def at_pixel_data(tag: Any, vr: Any, length: int) -> bool:
        reached.append(tag in (0x7FE00010, 0x7FE00009, 0x7FE00008))  # (Float/DoubleFloat)PixelData
        return reached[-1]

    try:
        ds = read_dataset(DicomBytesIO(head), False, True, stop_when=at_pixel_data)
    except Exception:  # a header longer than the head, or corrupt: the budget alone applies
        return None
    if not reached or not reached[-1]:
        return None
    rows, columns, frames, samples, bits = _dicom_pixel_description(ds, name, max_pixels)
    return -(-rows * columns * frames * samples * bits // 8)


def _first(value: Any) -> float:
    if isinstance(value, (list, tuple)) or type(value).__name__ == "MultiValue":
        value = value[0]
    return float(value)


def _dicom_window(ds: Any) -> tuple[float, float, str] | None:
    if "WindowCenter" not in ds or "WindowWidth" not in ds:
        return None
    try:
        center, width = _first(ds.WindowCenter), _first(ds.WindowWidth)
    except (TypeError, ValueError, IndexError):
        return None
    function = str(ds.get("VOILUTFunction", "LINEAR") or "LINEAR").upper()
    if width <= 0 or not np.isfinite(center) or not np.isfinite(width):
        return None
    return (center, width, function)


def _dicom_spacing(ds: Any) -> tuple[float, float] | None:
    spacing = ds.get("PixelSpacing")
    if spacing is None:
        try:
            spacing = ds.SharedFunctionalGroupsSequence[0].PixelMeasuresSequence[0].PixelSpacing
        except (AttributeError, IndexError, KeyError):
            return None
    try:
        row, col = float(spacing[0]), float(spacing[1])
    except (TypeError, ValueError, IndexError):
        return None
    return (row, col) if row > 0 and col > 0 else None


def _apply_window(values: np.ndarray, center: float, width: float, function: str) -> np.ndarray:
    """DICOM PS3.3 C.11.2.1.2 VOI windowing to [0, 1]."""
    if function == "SIGMOID":
        return 1.0 / (1.0 + np.exp(np.clip(-4.0 * (values - center) / width, -60.0, 60.0)))
    if function == "LINEAR_EXACT":
        return np.clip((values - center) / width + 0.5, 0.0, 1.0)
    if width <= 1.0:  # LINEAR with width 1 is a step at center - 0.5
        return (values > center - 0.5).astype(np.float64)
    return np.clip((values - (center - 0.5)) / (width - 1.0) + 0.5, 0.0, 1.0)


# ----------------------------------------------------------------------------------------------------------
# NIfTI (nibabel)
# ----------------------------------------------------------------------------------------------------------


def _nifti_version(head: bytes) -> int | None:
    if len(head) >= 348:
        for order in ("little", "big"):
            size = int.from_bytes(head[:4], order)
            if size == 348 and head[344:348] in (b"n+1\x00", b"ni1\x00"):
                return 1
            if size == 540 and len(head) >= 540 and head[4:8] in (b"n+2\x00", b"ni2\x00"):
                return 2
    return None


def _gunzip_head(data: bytes) -> bytes:
    with gzip.GzipFile(fileobj=io.BytesIO(data)) as stream:
        return stream.read(_NIFTI_HEADER_BYTES)


def _decode_nifti(
    data: bytes, name: str, fmt: str, max_pixels: int | None, slice_index: int | None, budget: int | None
) -> _Plane:
    import nibabel as nib
    from nibabel.arrayproxy import ArrayProxy

    compressed = data.startswith(_GZIP_MAGIC)
    try:
        head = _gunzip_head(data) if compressed else data[:_NIFTI_HEADER_BYTES]
    except (OSError, EOFError, zlib.error) as exc:
        raise ImageDecodeError(f"{name}: corrupt gzip stream ({exc})") from exc
    version = _nifti_version(head)
    if (version == 1 and head[344:348] == b"ni1\x00") or (version == 2 and head[4:8] == b"ni2\x00"):
        raise ImageDecodeError(
            f"{name}: NIfTI header of a .hdr/.img pair; only single-file .nii(.gz) is supported"
        )
    klass = nib.Nifti1Image if version == 1 else nib.Nifti2Image
    try:
        header = klass.header_class.from_fileobj(io.BytesIO(head))
        shape = tuple(int(s) for s in header.get_data_shape())
        dtype = header.get_data_dtype()
        offset = int(header.get_data_offset())
        slope, inter = header.get_slope_inter()
        zooms = header.get_zooms()
        unit = header.get_xyzt_units()[0]
    except Exception as exc:  # HeaderDataError and friends
        raise ImageDecodeError(f"{name}: corrupt NIfTI header ({exc})") from exc
    while len(shape) > 2 and shape[-1] == 1:
        shape = shape[:-1]  # drop trailing singleton axes (e.g. t = 1)
    if len(shape) < 2:
        raise ImageDecodeError(f"{name}: NIfTI of shape {shape} is not an image (need 2 or 3 axes)")
    if len(shape) > 3:
        raise ImageDecodeError(f"{name}: NIfTI of shape {shape} has more than 3 non-singleton axes")
    if dtype.fields is not None:
        raise ImageDecodeError(f"{name}: NIfTI with structured dtype {dtype} (e.g. RGB) is not supported")
    height, width = shape[0], shape[1]
    _check_plane(name, fmt, height, width, max_pixels)
    _check_volume(name, fmt, int(np.prod(shape)), max_pixels)
    if offset < 0:
        raise ImageDecodeError(f"{name}: corrupt NIfTI header (vox_offset {offset} is negative)")
    depth = shape[2] if len(shape) == 3 else 1
    index = _pick_slice(name, depth, slice_index, "slices")
    # Voxels are stored column-major, so plane k of (H, W, D) is one run of H * W voxels.
    plane_bytes = height * width * dtype.itemsize
    start = offset + index * plane_bytes
    if compressed and budget is not None and start + plane_bytes > budget:
        raise ImageTooLargeError(
            f"{name}: NIfTI slice {index} of {width}x{height}x{depth} {dtype.name} voxels ends "
            f"{start + plane_bytes} bytes into the gzip stream, over the limit of {budget} inflated bytes "
            "(decompression bomb protection)"
        )
    try:
        raw = _nifti_plane_bytes(data, compressed, start, plane_bytes)
        proxy = ArrayProxy(io.BytesIO(raw), ((height, width), dtype, 0, 1.0 if slope is None else slope,
                                              0.0 if inter is None else inter), mmap=False, order="F")
        values = np.asarray(proxy)  # nibabel's scl_slope/scl_inter scaling, as image.dataobj applies it
    except Exception as exc:  # short reads, bad dtypes, corrupt gzip...
        raise ImageDecodeError(f"{name}: truncated or corrupt NIfTI data ({exc})") from exc
    factor = {"meter": 1000.0, "micron": 0.001}.get(unit, 1.0)  # "mm" and "unknown" taken as mm
    spacing = (float(zooms[0]) * factor, float(zooms[1]) * factor)
    return _Plane(values, spacing if min(spacing) > 0 else None, fmt)


def _nifti_plane_bytes(data: bytes, compressed: bool, start: int, length: int) -> bytes:
    """``length`` bytes from ``start`` of the (inflated) file; a gzip stream is inflated only that far.

    Raises:
        EOFError: the file ends before ``start + length``.
    """
    end = start + length
    if not compressed:
        if len(data) < end:
            raise EOFError(f"the file has {len(data)} bytes, the slice ends at byte {end}")
        return data[start:end]
    plane, seen = bytearray(), 0
    for chunk in _inflate(data, 16 + zlib.MAX_WBITS):
        low, high = max(start - seen, 0), min(end - seen, len(chunk))
        if low < high:
            plane += chunk[low:high]
        seen += len(chunk)
        if seen >= end:
            return bytes(plane)
    raise EOFError(f"the gzip stream inflates to {seen} bytes, the slice ends at byte {end}")


# ----------------------------------------------------------------------------------------------------------
# Mapping stored values to [0, 1] and to a binary mask
# ----------------------------------------------------------------------------------------------------------


def _minmax(values: np.ndarray) -> np.ndarray:
    values = np.asarray(values, np.float64)
    finite = np.isfinite(values)
    if not finite.any():
        return np.zeros(values.shape, np.float64)
    low, high = float(values[finite].min()), float(values[finite].max())
    values = np.where(finite, values, low)
    if high - low <= 0.0:
        return np.zeros(values.shape, np.float64)
    return (values - low) / (high - low)


# uint8 -> [0, 1] float32, bit-identical to the float64 division below (a lookup is ~10x cheaper per image).
_UINT8_TO_UNIT = (np.arange(256, dtype=np.float64) / 255.0).astype(np.float32)


def _to_unit(plane: _Plane) -> np.ndarray:
    values = plane.values
    if (plane.window is None and plane.full_scale == 255 and values.dtype == np.uint8 and values.ndim == 2
            and not plane.invert):
        return _UINT8_TO_UNIT[values]
    if plane.window is not None:
        unit = _apply_window(np.asarray(values, np.float64), *plane.window)
    elif plane.full_scale is not None:
        unit = np.clip(values.astype(np.float64) / plane.full_scale, 0.0, 1.0)
    else:
        unit = _minmax(values)
    if unit.ndim == 3:
        unit = unit[..., :3] @ np.asarray(LUMA_WEIGHTS)
    if plane.invert:
        unit = 1.0 - unit
    return np.ascontiguousarray(np.clip(unit, 0.0, 1.0), dtype=np.float32)


def _binarise(plane: _Plane, name: str) -> np.ndarray:
    values = plane.values
    if values.ndim == 3:
        values = values[..., :3].max(axis=-1)
    finite = np.isfinite(values) if values.dtype.kind == "f" else None
    if finite is not None and not finite.all():
        raise ImageDecodeError(f"{name}: mask contains NaN or infinite values")
    peak = float(values.max())
    if peak <= 1.0:
        return (values > 0.5).astype(np.uint8)
    dtype = values.dtype
    if dtype == np.uint8 and peak > 127:
        return (values > 127).astype(np.uint8)
    if dtype == np.uint16 and peak > 32767:
        return (values > 32767).astype(np.uint8)
    raise ImageDecodeError(
        f"{name}: ambiguous mask values (dtype {dtype}, max {peak:g}): expected a {{0, 1}} label map or a "
        "0/255 (8-bit) or 0/65535 (16-bit) mask; convert multi-label maps to binary first"
    )
