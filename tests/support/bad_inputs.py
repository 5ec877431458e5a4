"""Malformed and hostile inputs for the reliability tests, and the check that answers leak no internals.

Builders return the raw bytes a client would send; none needs a server. ``assert_no_leak`` is the one
definition of "an error answer leaks internals": a stack trace, a source file or a server path.
"""

from __future__ import annotations

import io
import re
import struct
import zlib

import numpy as np
import pydicom
from PIL import Image
from pydicom.dataset import FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from core.imageio import encode_png
from core.phantoms import breast_ultrasound

__all__ = [
    "LEAKS",
    "assert_no_leak",
    "dicom_bytes",
    "header_only_png",
    "phantom_png",
    "pil_bytes",
]

# A stack trace, a Python source file or an absolute server path in a client-visible answer.
LEAKS = re.compile(r"Traceback|File \"|/work/|/tmp/|/home/|site-packages|\.py\b")


def assert_no_leak(text: str) -> None:
    match = LEAKS.search(text)
    assert match is None, f"answer leaks internals ({match.group(0)!r}): {text[:500]}"


def phantom_png(seed: int = 5, size: int = 64) -> bytes:
    """A breast-ultrasound phantom, ``size`` x ``size`` 8-bit gray PNG."""
    image, _ = breast_ultrasound(seed, size=size)
    return encode_png(image)


def pil_bytes(array: np.ndarray, fmt: str, **kwargs) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format=fmt, **kwargs)
    return buffer.getvalue()


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def header_only_png(width: int, height: int) -> bytes:
    """A valid PNG header claiming ``width`` x ``height`` 8-bit gray pixels with almost no pixel data.

    A decoder that allocated before checking the size would try to inflate width x height bytes; one that
    checks the header first refuses it at once (and never reports truncation instead).
    """
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 64)
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", idat) + _chunk(b"IEND", b"")


def dicom_bytes(
    *,
    pixels: np.ndarray | None,
    patient_name: str = "Anonymous^Test",
    patient_id: str = "TEST-0000",
    modality: str = "US",
) -> bytes:
    """A single-frame DICOM Part 10 file (explicit VR little endian) with the given patient tags.

    ``pixels`` (H, W) uint8 gray, or None for an instance without pixel data (e.g. a report).
    """
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.6.1"  # Ultrasound Image Storage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = pydicom.Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.FrameOfReferenceUID = generate_uid()
    ds.Modality = modality
    ds.PatientName = patient_name
    ds.PatientID = patient_id
    ds.PatientBirthDate = "19700101"
    ds.PatientSex = "O"
    ds.StudyDate = "20240101"
    ds.StudyTime = "120000"
    ds.AccessionNumber = "ACC-0001"
    ds.StudyID = "1"
    ds.SeriesNumber = 1
    ds.InstanceNumber = 1
    if pixels is not None:
        pixels = np.ascontiguousarray(pixels, dtype=np.uint8)
        ds.Rows, ds.Columns = pixels.shape
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.BitsAllocated = 8
        ds.BitsStored = 8
        ds.HighBit = 7
        ds.PixelRepresentation = 0
        ds.PixelSpacing = [0.1, 0.1]
        ds.PixelData = pixels.tobytes()
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()
