"""core.dicom_seg: a BINARY SEG referencing its source, with optional removal of patient identifiers."""

from __future__ import annotations

import io

import highdicom as hd
import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file

from core.dicom_seg import build_dicom_seg


@pytest.fixture(scope="module")
def ct_small() -> pydicom.Dataset:
    return pydicom.dcmread(get_testdata_file("CT_small.dcm"))


def _lesion_mask(shape: tuple[int, int]) -> np.ndarray:
    mask = np.zeros(shape, np.uint8)
    mask[10:40, 20:50] = 1
    mask[44, 5] = 1
    return mask


def test_seg_references_source_and_round_trips_the_mask(ct_small):
    mask = _lesion_mask((128, 128))
    data = build_dicom_seg(ct_small, mask, model_version="deadbeef" * 8)
    seg = pydicom.dcmread(io.BytesIO(data))

    assert seg.SOPClassUID == "1.2.840.10008.5.1.4.1.1.66.4"  # Segmentation Storage
    assert seg.Modality == "SEG" and seg.SegmentationType == "BINARY"
    assert seg.StudyInstanceUID == ct_small.StudyInstanceUID
    assert seg.FrameOfReferenceUID == ct_small.FrameOfReferenceUID
    assert seg.SeriesInstanceUID != ct_small.SeriesInstanceUID
    referenced_series = seg.ReferencedSeriesSequence[0]
    assert referenced_series.SeriesInstanceUID == ct_small.SeriesInstanceUID
    assert referenced_series.ReferencedInstanceSequence[0].ReferencedSOPInstanceUID == ct_small.SOPInstanceUID
    source_ref = seg.PerFrameFunctionalGroupsSequence[0].DerivationImageSequence[0].SourceImageSequence[0]
    assert source_ref.ReferencedSOPInstanceUID == ct_small.SOPInstanceUID

    segment = seg.SegmentSequence[0]
    assert segment.SegmentLabel == "Lesion" and segment.SegmentAlgorithmType == "AUTOMATIC"
    assert segment.SegmentedPropertyTypeCodeSequence[0].CodeValue == "52988006"
    assert segment.SegmentedPropertyCategoryCodeSequence[0].CodeValue == "49755003"
    assert segment.SegmentationAlgorithmIdentificationSequence[0].AlgorithmVersion == "deadbeef" * 8

    np.testing.assert_array_equal(seg.pixel_array, mask)
    assert isinstance(hd.seg.segread(io.BytesIO(data)), hd.seg.Segmentation)
    # Without anonymisation the patient is the source's patient.
    assert str(seg.PatientName) == str(ct_small.PatientName) and seg.PatientID == ct_small.PatientID


def test_anonymize_strips_patient_identifiers_but_keeps_references(ct_small):
    data = build_dicom_seg(ct_small, _lesion_mask((128, 128)), model_version="v1", anonymize=True)
    seg = pydicom.dcmread(io.BytesIO(data))
    assert str(seg.PatientName) == "" and seg.PatientID == "" and seg.PatientBirthDate == ""
    assert "OtherPatientIDsSequence" not in seg and "PatientAge" not in seg and "PatientWeight" not in seg
    assert seg.PatientIdentityRemoved == "YES"
    for identifying in (b"CompressedSamples", b"ABCD1234", b"1234ABCD", b"JFK IMAGING"):
        assert identifying not in data
    assert seg.StudyInstanceUID == ct_small.StudyInstanceUID
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == ct_small.SeriesInstanceUID
    # The source object itself is untouched.
    assert str(ct_small.PatientName) == "CompressedSamples^CT1"


def test_source_missing_type2_attributes_gets_them_empty_not_invented():
    source = pydicom.Dataset()
    source.StudyInstanceUID, source.SeriesInstanceUID, source.SOPInstanceUID = hd.UID(), hd.UID(), hd.UID()
    source.SOPClassUID = "1.2.840.10008.5.1.4.1.1.7"  # Secondary Capture, no frame of reference
    source.Modality = "US"
    source.Rows, source.Columns = 48, 64
    source.PatientName, source.PatientID = "Doe^Jane", "P-7"
    data = build_dicom_seg(source, _lesion_mask((48, 64)), model_version="v1")
    seg = pydicom.dcmread(io.BytesIO(data))
    assert seg.PatientBirthDate == "" and seg.StudyDate == "" and seg.AccessionNumber == ""
    assert str(seg.PatientName) == "Doe^Jane"
    np.testing.assert_array_equal(seg.pixel_array, _lesion_mask((48, 64)))


def test_mask_shape_and_values_are_validated(ct_small):
    with pytest.raises(ValueError, match=r"mask shape \(64, 64\)"):
        build_dicom_seg(ct_small, np.zeros((64, 64), np.uint8), model_version="v")
    with pytest.raises(ValueError, match="only 0 and 1"):
        build_dicom_seg(ct_small, np.full((128, 128), 255, np.uint8), model_version="v")
    broken = pydicom.Dataset()
    broken.Rows, broken.Columns = 8, 8
    with pytest.raises(ValueError, match="StudyInstanceUID"):
        build_dicom_seg(broken, np.zeros((8, 8), np.uint8), model_version="v")


# --- Sources as the service receives them: Part-10 bytes, decoded by core.imageio, SEG read back by highdicom ---

_US_IMAGE = "1.2.840.10008.5.1.4.1.1.6.1"  # Ultrasound Image Storage
_US_MULTIFRAME = "1.2.840.10008.5.1.4.1.1.3.1"  # Ultrasound Multi-frame Image Storage
_ENHANCED_CT = "1.2.840.10008.5.1.4.1.1.2.1"


def _ultrasound_file(
    *,
    frames: int = 1,
    photometric: str = "MONOCHROME2",
    spacing: tuple[float, float] | None = (0.21, 0.34),
    rows: int = 48,
    columns: int = 64,
) -> bytes:
    """A 2-D ultrasound Part-10 file as scanners write it: no SliceThickness, no frame of reference."""
    ds = pydicom.Dataset()
    ds.file_meta = pydicom.dataset.FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = pydicom.uid.ExplicitVRLittleEndian
    ds.SOPClassUID = _US_MULTIFRAME if frames > 1 else _US_IMAGE
    ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID = hd.UID(), hd.UID(), hd.UID()
    ds.PatientName, ds.PatientID, ds.Modality = "Doe^Jane", "P-7", "US"
    ds.Rows, ds.Columns, ds.SamplesPerPixel = rows, columns, 1
    ds.PhotometricInterpretation = photometric
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    if frames > 1:
        ds.NumberOfFrames = frames
        ds.FrameTime = 33.3
        ds.FrameIncrementPointer = pydicom.tag.Tag("FrameTime")
    if spacing is not None:
        ds.PixelSpacing = list(spacing)
    pixels = np.random.default_rng(frames).integers(0, 256, (frames, rows, columns), dtype=np.uint8)
    ds.PixelData = pixels.tobytes()
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def _seg_for_upload(data: bytes, mask_seed: int) -> tuple[pydicom.Dataset, np.ndarray, bytes]:
    """Decode ``data`` as the service does, predict a random mask on it, write its SEG."""
    from core.imageio import decode_image

    decoded = decode_image(data)
    mask = (np.random.default_rng(mask_seed).random(decoded.shape) > 0.7).astype(np.uint8)
    return decoded.source, mask, build_dicom_seg(decoded.source, mask, model_version="v1")


def _read_back(data: bytes) -> tuple[pydicom.Dataset, hd.seg.Segmentation]:
    dataset = pydicom.dcmread(io.BytesIO(data))
    return dataset, hd.seg.Segmentation.from_dataset(dataset)


def _seg_pixel_spacing(dataset: pydicom.Dataset) -> list[float] | None:
    shared = dataset.SharedFunctionalGroupsSequence[0]
    if "PixelMeasuresSequence" not in shared:
        return None
    return [float(v) for v in shared.PixelMeasuresSequence[0].PixelSpacing]


def test_ultrasound_without_slice_thickness_reads_back_with_highdicom():
    source, mask, data = _seg_for_upload(_ultrasound_file(), mask_seed=1)
    assert "SliceThickness" not in source
    dataset, seg = _read_back(data)  # raised "required attributes for a Pixel Measures Sequence" before
    pixels = seg.get_pixels_by_source_instance([source.SOPInstanceUID], segment_numbers=[1])
    np.testing.assert_array_equal(pixels[0, :, :, 0], mask)
    np.testing.assert_array_equal(dataset.pixel_array, mask)
    assert (dataset.Rows, dataset.Columns) == (48, 64)
    assert _seg_pixel_spacing(dataset) == [0.21, 0.34]
    # The thickness the reader needs is nominal: the finer in-plane spacing.
    assert float(dataset.SharedFunctionalGroupsSequence[0].PixelMeasuresSequence[0].SliceThickness) == 0.21


def test_source_without_pixel_spacing_gives_a_seg_without_one():
    source, mask, data = _seg_for_upload(_ultrasound_file(spacing=None, rows=40, columns=30), mask_seed=2)
    dataset, seg = _read_back(data)
    assert _seg_pixel_spacing(dataset) is None and "PixelSpacing" not in dataset
    assert (dataset.Rows, dataset.Columns) == (40, 30)
    pixels = seg.get_pixels_by_source_instance([source.SOPInstanceUID], segment_numbers=[1])
    np.testing.assert_array_equal(pixels[0, :, :, 0], mask)


def test_monochrome1_source_keeps_the_mask_uninverted():
    source, mask, data = _seg_for_upload(_ultrasound_file(photometric="MONOCHROME1"), mask_seed=3)
    dataset, seg = _read_back(data)
    assert dataset.PhotometricInterpretation == "MONOCHROME2"
    np.testing.assert_array_equal(dataset.pixel_array, mask)
    pixels = seg.get_pixels_by_source_instance([source.SOPInstanceUID], segment_numbers=[1])
    np.testing.assert_array_equal(pixels[0, :, :, 0], mask)
    assert _seg_pixel_spacing(dataset) == [0.21, 0.34]


def test_multiframe_ultrasound_seg_references_the_decoded_frame():
    source, mask, data = _seg_for_upload(_ultrasound_file(frames=5), mask_seed=4)
    dataset, seg = _read_back(data)
    assert dataset.NumberOfFrames == 1 and (dataset.Rows, dataset.Columns) == (48, 64)
    reference = dataset.PerFrameFunctionalGroupsSequence[0].DerivationImageSequence[0].SourceImageSequence[0]
    assert reference.ReferencedSOPInstanceUID == source.SOPInstanceUID
    assert reference.ReferencedFrameNumber == 3  # decode_image's default plane: the middle of 5
    pixels = seg.get_pixels_by_source_frame(source.SOPInstanceUID, [3], segment_numbers=[1])
    np.testing.assert_array_equal(pixels[0, :, :, 0], mask)
    assert _seg_pixel_spacing(dataset) == [0.21, 0.34]
    # An explicit frame is referenced as given; one past the end is refused, naming the count.
    other = pydicom.dcmread(io.BytesIO(build_dicom_seg(source, mask, model_version="v1", frame_index=0)))
    assert other.PerFrameFunctionalGroupsSequence[0].DerivationImageSequence[0] \
        .SourceImageSequence[0].ReferencedFrameNumber == 1
    with pytest.raises(ValueError, match="frame_index 5 is out of range for a source with 5 frame"):
        build_dicom_seg(source, mask, model_version="v1", frame_index=5)


def _enhanced_ct(frames: int = 4) -> pydicom.Dataset:
    """An enhanced multi-frame CT header: a frame of reference, geometry in functional groups."""
    ds = pydicom.Dataset()
    ds.SOPClassUID = _ENHANCED_CT
    ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID = hd.UID(), hd.UID(), hd.UID()
    ds.FrameOfReferenceUID = hd.UID()
    ds.Modality, ds.Rows, ds.Columns, ds.NumberOfFrames = "CT", 32, 24, frames
    shared = pydicom.Dataset()
    orientation, measures = pydicom.Dataset(), pydicom.Dataset()
    orientation.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    measures.PixelSpacing, measures.SliceThickness = [0.5, 0.75], 2.0
    shared.PlaneOrientationSequence = pydicom.Sequence([orientation])
    shared.PixelMeasuresSequence = pydicom.Sequence([measures])
    ds.SharedFunctionalGroupsSequence = pydicom.Sequence([shared])
    per_frame = []
    for index in range(frames):
        item, position = pydicom.Dataset(), pydicom.Dataset()
        position.ImagePositionPatient = [-10.0, -20.0, 2.0 * index]
        item.PlanePositionSequence = pydicom.Sequence([position])
        per_frame.append(item)
    ds.PerFrameFunctionalGroupsSequence = pydicom.Sequence(per_frame)
    return ds


def test_enhanced_multiframe_seg_sits_on_the_chosen_frame_in_patient_space():
    source = _enhanced_ct()
    mask = np.zeros((32, 24), np.uint8)
    mask[4:20, 3:11] = 1
    dataset, seg = _read_back(build_dicom_seg(source, mask, model_version="v1", frame_index=1))
    assert dataset.FrameOfReferenceUID == source.FrameOfReferenceUID
    frame = dataset.PerFrameFunctionalGroupsSequence[0]
    assert [float(v) for v in frame.PlanePositionSequence[0].ImagePositionPatient] == [-10.0, -20.0, 2.0]
    assert frame.DerivationImageSequence[0].SourceImageSequence[0].ReferencedFrameNumber == 2
    assert _seg_pixel_spacing(dataset) == [0.5, 0.75]
    pixels = seg.get_pixels_by_source_frame(source.SOPInstanceUID, [2], segment_numbers=[1])
    np.testing.assert_array_equal(pixels[0, :, :, 0], mask)


def _patient_space_source(**geometry) -> pydicom.Dataset:
    ds = pydicom.Dataset()
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.2"  # CT Image Storage
    ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID = hd.UID(), hd.UID(), hd.UID()
    ds.FrameOfReferenceUID, ds.Modality, ds.Rows, ds.Columns = hd.UID(), "CT", 48, 64
    ds.ImagePositionPatient, ds.ImageOrientationPatient = [-5.0, 3.0, 12.5], [1, 0, 0, 0, 1, 0]
    for keyword, value in geometry.items():
        setattr(ds, keyword, value)
    return ds


def test_patient_space_source_without_slice_thickness_reads_back():
    source = _patient_space_source(PixelSpacing=[0.4, 0.4])
    mask = _lesion_mask((48, 64))
    dataset, seg = _read_back(build_dicom_seg(source, mask, model_version="v1"))
    assert "SliceThickness" not in source  # the caller's dataset is not modified
    assert dataset.FrameOfReferenceUID == source.FrameOfReferenceUID
    assert _seg_pixel_spacing(dataset) == [0.4, 0.4]
    position = dataset.PerFrameFunctionalGroupsSequence[0].PlanePositionSequence[0].ImagePositionPatient
    assert [float(v) for v in position] == [-5.0, 3.0, 12.5]
    pixels = seg.get_pixels_by_source_instance([source.SOPInstanceUID], segment_numbers=[1])
    np.testing.assert_array_equal(pixels[0, :, :, 0], mask)


def test_patient_space_source_without_pixel_spacing_is_a_value_error_naming_it():
    # A ValueError (the service's 400 naming dicom_seg), not an AttributeError escaping as a 500.
    with pytest.raises(ValueError, match="PixelSpacing"):
        build_dicom_seg(_patient_space_source(), _lesion_mask((48, 64)), model_version="v1")
