"""Compressed uploads that inflate far beyond their size, for the decode-budget tests.

A GiB of zeros deflates to about a MiB; the builders repeat one flushed deflate block of zeros instead of
compressing them, so making a bomb takes milliseconds and a few MiB of memory.
"""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset, write_file_meta_info
from pydicom.uid import DeflatedExplicitVRLittleEndian, MRImageStorage, generate_uid

__all__ = ["deflate_with_zeros", "deflated_dicom", "deflated_dicom_bomb", "gzip_nifti_bomb"]

_MIB = 1 << 20


def deflate_with_zeros(prefix: bytes, zero_mib: int) -> bytes:
    """A raw deflate stream (no zlib/gzip wrapper) of ``prefix`` followed by ``zero_mib`` MiB of zeros."""
    compressor = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    head = compressor.compress(prefix) + compressor.flush(zlib.Z_FULL_FLUSH)
    # After a full flush a block refers to nothing before it, so the same bytes may be repeated.
    block = compressor.compress(bytes(_MIB)) + compressor.flush(zlib.Z_FULL_FLUSH)
    return head + block * zero_mib + compressor.flush(zlib.Z_FINISH)


def _mr_header(rows: int, columns: int, bits: int = 16) -> Dataset:
    ds = Dataset()
    ds.SOPClassUID = MRImageStorage
    ds.SOPInstanceUID = generate_uid()
    ds.Modality = "MR"
    ds.Rows, ds.Columns = rows, columns
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = bits, bits, bits - 1, 0
    return ds


def _file(ds: Dataset, deflated_dataset: bytes) -> bytes:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = ds.SOPClassUID
    meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    out = DicomBytesIO()
    out.write(b"\0" * 128 + b"DICM")
    write_file_meta_info(out, meta)
    return out.getvalue() + deflated_dataset


def _dataset_bytes(ds: Dataset) -> bytes:
    out = DicomBytesIO()
    out.is_little_endian, out.is_implicit_VR = True, False
    write_dataset(out, ds)
    return out.getvalue()


def deflated_dicom_bomb(rows: int = 512, columns: int = 512, zero_mib: int = 1024, *,
                        private_mib: int = 0) -> bytes:
    """A Deflated Explicit VR Little Endian MR file declaring ``rows`` x ``columns`` 16-bit pixels whose
    PixelData element holds ``zero_mib`` MiB of zeros (1024: about 1 MiB on the wire, 1 GiB inflated).

    ``private_mib`` > 0 puts a private OB element of that many MiB of zeros before the pixel description,
    so that a reader looking for Rows and Columns in the first inflated MiB does not find them.
    """
    ds = _mr_header(rows, columns)
    if private_mib:
        ds.add_new(0x00090010, "LO", "MEDREFINE TEST")  # private creator of block 0x10
        ds.add_new(0x00091010, "OB", bytes(private_mib * _MIB))
    pixel_header = struct.pack("<HH2sHI", 0x7FE0, 0x0010, b"OW", 0, zero_mib * _MIB)
    return _file(ds, deflate_with_zeros(_dataset_bytes(ds) + pixel_header, zero_mib))


def deflated_dicom(pixels: np.ndarray) -> bytes:
    """An honest Deflated Explicit VR Little Endian MR file holding ``pixels`` ``(H, W) uint16``."""
    ds = _mr_header(*pixels.shape)
    ds.PixelData = np.ascontiguousarray(pixels, np.uint16).tobytes()
    compressor = zlib.compressobj(6, zlib.DEFLATED, -zlib.MAX_WBITS)
    deflated = compressor.compress(_dataset_bytes(ds)) + compressor.flush()
    data = _file(ds, deflated)
    assert pydicom.dcmread(io.BytesIO(data)).file_meta.TransferSyntaxUID == DeflatedExplicitVRLittleEndian
    return data


def gzip_nifti_bomb(height: int, width: int, depth: int) -> bytes:
    """A ``.nii.gz`` declaring ``height`` x ``width`` x ``depth`` uint8 voxels, all zero.

    Its gzip trailer (CRC-32 and size) is not computed (it would take seconds): no decoder that reads only
    up to the middle slice reaches it, and a decoder that refuses from the header reads nothing.
    """
    import nibabel as nib

    header = nib.Nifti1Header()
    header.set_data_shape((height, width, depth))
    header.set_data_dtype(np.uint8)
    header.set_zooms((1.0, 1.0, 1.0))
    header["vox_offset"] = 352
    head = header.binaryblock + b"\0" * 4  # NIfTI-1: 348-byte header, 4-byte extension flag, data at 352
    voxels = height * width * depth
    zero_mib = -(-voxels // _MIB)
    gzip_header = b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x02\xff"  # deflate, no flags, no mtime
    return gzip_header + deflate_with_zeros(head, zero_mib) + struct.pack("<II", 0, 0)
