"""Write a predicted lesion mask as a DICOM Segmentation (SEG) object referencing its source image.

The SEG is BINARY with one segment, "Lesion" (SCT 49755003 "Morphologically abnormal structure" /
SCT 52988006 "Lesion"), AUTOMATIC, with the algorithm identified by name, family (DCM "Artificial
Intelligence") and the served model version. It lives in the source's study (same StudyInstanceUID,
same frame of reference when the source has one) in a new series, and references the source's
series and SOP instance.

highdicom copies the Patient and General Study modules from the source and reads their type 2
attributes directly (PatientBirthDate, PatientSex, AccessionNumber, StudyID, StudyDate, StudyTime ...).
Where the source lacks one, it is written empty (type 2 allows that); nothing is invented.
With ``anonymize=True`` the patient identifiers are removed from the written object (the type 2 ones
are left empty, the rest deleted) and PatientIdentityRemoved is set to YES; the study/series/instance
UIDs are kept so the SEG still references its source.
"""

from __future__ import annotations

import io
from copy import deepcopy

import highdicom as hd
import numpy as np
import pydicom
from pydicom.sr.codedict import codes

__all__ = ["PATIENT_IDENTIFIER_KEYWORDS", "build_dicom_seg"]

# Type 2 attributes highdicom reads from the source's Patient / General Study modules.
_TYPE2_SOURCE_KEYWORDS = (
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientSex",
    "AccessionNumber",
    "StudyID",
    "StudyDate",
    "StudyTime",
    "ReferringPhysicianName",
)

# Patient-identifying attributes (DICOM PS3.15 Basic Application Level Confidentiality Profile, the
# subset that a Patient / General Study / General Equipment module can carry). Type 2 ones are emptied.
PATIENT_IDENTIFIER_KEYWORDS = (
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientBirthTime",
    "PatientSex",
    "PatientAge",
    "PatientSize",
    "PatientWeight",
    "PatientAddress",
    "PatientTelephoneNumbers",
    "PatientMotherBirthName",
    "PatientComments",
    "PatientBirthName",
    "OtherPatientIDs",
    "OtherPatientIDsSequence",
    "OtherPatientNames",
    "IssuerOfPatientID",
    "IssuerOfPatientIDQualifiersSequence",
    "EthnicGroup",
    "MedicalRecordLocator",
    "AdditionalPatientHistory",
    "ResponsiblePerson",
    "AccessionNumber",
    "StudyID",
    "StudyDate",
    "StudyTime",
    "ReferringPhysicianName",
    "InstitutionName",
    "InstitutionAddress",
    "StationName",
    "OperatorsName",
    "PerformingPhysicianName",
    "NameOfPhysiciansReadingStudy",
)
_TYPE2_OUTPUT_KEYWORDS = frozenset(_TYPE2_SOURCE_KEYWORDS)


def _blank_identifiers(dataset: pydicom.Dataset) -> None:
    """Empty the type 2 identifiers and delete the other patient identifiers, in place."""
    for keyword in PATIENT_IDENTIFIER_KEYWORDS:
        if keyword in _TYPE2_OUTPUT_KEYWORDS:
            setattr(dataset, keyword, "")
        elif keyword in dataset:
            delattr(dataset, keyword)


def _prepared_source(source: pydicom.Dataset, anonymize: bool) -> pydicom.Dataset:
    """A copy of ``source`` holding every type 2 attribute highdicom reads (empty where absent)."""
    for keyword in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "SOPClassUID", "Rows", "Columns"):
        if keyword not in source:
            raise ValueError(f"source DICOM dataset lacks {keyword}; a SEG must reference a complete image instance")
    prepared = deepcopy(source)
    for keyword in _TYPE2_SOURCE_KEYWORDS:
        if keyword not in prepared:
            setattr(prepared, keyword, "")
    if "Modality" not in prepared:
        raise ValueError("source DICOM dataset lacks Modality (type 1 of the General Series module)")
    if anonymize:
        _blank_identifiers(prepared)
    return prepared


def build_dicom_seg(
    source: pydicom.Dataset,
    mask: np.ndarray,
    *,
    model_version: str,
    anonymize: bool = False,
    algorithm_name: str = "medrefine UltraRefiner",
    segment_label: str = "Lesion",
    series_number: int = 900,
    series_description: str = "medrefine lesion segmentation",
    manufacturer: str = "medrefine",
    software_version: str = "0.1.0",
) -> bytes:
    """Encode ``mask`` as a DICOM SEG instance derived from ``source``.

    Args:
        source: the single-frame image instance the mask was predicted on (as read by pydicom).
        mask: (Rows, Columns) uint8/bool {0, 1} in the source's pixel frame.
        model_version: the served model version (the artifact manifest's version), recorded as the
            algorithm version.
        anonymize: remove patient identifiers from the written object (UIDs are kept).
        algorithm_name, segment_label, series_number, series_description, manufacturer,
        software_version: written as given.

    Returns:
        The SEG as a DICOM Part 10 file (bytes, explicit VR little endian).

    Raises:
        ValueError: if the source is multi-frame or lacks identifying UIDs, or the mask's shape or
            values do not match.
    """
    if int(source.get("NumberOfFrames", 1) or 1) != 1:
        raise ValueError(f"source DICOM has NumberOfFrames={source.NumberOfFrames}; only single-frame sources are supported")
    mask = np.asarray(mask)
    expected = (int(source.Rows), int(source.Columns)) if "Rows" in source and "Columns" in source else None
    if mask.ndim != 2 or (expected is not None and mask.shape != expected):
        raise ValueError(f"mask shape {mask.shape} does not match the source image (Rows, Columns) = {expected}")
    if mask.dtype != np.bool_ and not np.isin(mask, (0, 1)).all():
        raise ValueError(f"mask must hold only 0 and 1, got values in [{mask.min()}, {mask.max()}]")
    prepared = _prepared_source(source, anonymize)

    algorithm = hd.AlgorithmIdentificationSequence(
        name=algorithm_name,
        family=codes.DCM.ArtificialIntelligence,
        version=str(model_version)[:64],
    )
    segment = hd.seg.SegmentDescription(
        segment_number=1,
        segment_label=segment_label,
        segmented_property_category=codes.SCT.MorphologicallyAbnormalStructure,
        segmented_property_type=codes.SCT.Lesion,
        algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
        algorithm_identification=algorithm,
    )
    seg = hd.seg.Segmentation(
        source_images=[prepared],
        pixel_array=mask.astype(np.uint8)[None],  # (1, Rows, Columns): one frame
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=[segment],
        series_instance_uid=hd.UID(),
        series_number=series_number,
        sop_instance_uid=hd.UID(),
        instance_number=1,
        manufacturer=manufacturer,
        manufacturer_model_name=algorithm_name[:64],
        software_versions=software_version,
        device_serial_number="0",
        series_description=series_description,
        omit_empty_frames=False,  # an empty prediction is still a result worth storing
    )
    if anonymize:
        _blank_identifiers(seg)
        seg.PatientIdentityRemoved = "YES"
        seg.DeidentificationMethod = "medrefine: patient identifiers removed, UIDs retained"
    buffer = io.BytesIO()
    seg.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()
