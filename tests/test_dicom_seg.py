"""service.dicom_seg: a BINARY SEG referencing its source, with optional removal of patient identifiers."""

from __future__ import annotations

import io

import highdicom as hd
import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file

from service.dicom_seg import build_dicom_seg


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
