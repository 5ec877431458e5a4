"""Write a predicted lesion mask as a DICOM Segmentation (SEG) object referencing its source image.
(Details: docs/architecture.md, "core".)
"""

from __future__ import annotations

import io
from copy import deepcopy

import highdicom as hd
import numpy as np
import pydicom
from pydicom.sr.codedict import codes

from core.errors import InputError

__all__ = ["PATIENT_IDENTIFIER_KEYWORDS", "SegSourceError", "build_dicom_seg"]

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


class SegSourceError(InputError):
    """The source DICOM lacks what a SEG must reference or state (the client's upload is at fault)."""


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
            raise SegSourceError(
                f"source DICOM dataset lacks {keyword}; a SEG must reference a complete image instance"
            )
    prepared = deepcopy(source)
    for keyword in _TYPE2_SOURCE_KEYWORDS:
        if keyword not in prepared:
            setattr(prepared, keyword, "")
    if "Modality" not in prepared:
        raise SegSourceError("source DICOM dataset lacks Modality (type 1 of the General Series module)")
    if anonymize:
        _blank_identifiers(prepared)
    return prepared


def _frame_count(source: pydicom.Dataset) -> int:
    try:
        return max(int(source.get("NumberOfFrames", 1) or 1), 1)
    except (TypeError, ValueError):
        raise SegSourceError(f"source DICOM has NumberOfFrames={source.NumberOfFrames!r}, not an integer") from None


def _functional_group(source: pydicom.Dataset, frame_index: int, sequence: str) -> pydicom.Dataset | None:
    """The frame's item of a functional-group ``sequence`` (per-frame first, then shared), or ``None``."""
    for groups, index in (("PerFrameFunctionalGroupsSequence", frame_index), ("SharedFunctionalGroupsSequence", 0)):
        try:
            return getattr(source[groups].value[index], sequence)[0]
        except (KeyError, IndexError, AttributeError):
            continue
    return None


def _pixel_measures(source: pydicom.Dataset, frame_index: int) -> hd.PixelMeasuresSequence | None:
    """The SEG's Pixel Measures: the source frame's PixelSpacing, and a SliceThickness always beside it.

    ``None`` when the source has no PixelSpacing (the SEG then states none either). A 2-D source
    (ultrasound, secondary capture) usually has no SliceThickness, but highdicom's reader requires one
    wherever PixelSpacing is written, and DICOM does once a frame of reference is present (PS3.3
    C.7.6.16.2.1); the SEG then states a nominal thickness equal to the finer in-plane spacing.
    """
    measures = _functional_group(source, frame_index, "PixelMeasuresSequence") or source
    spacing = measures.get("PixelSpacing")
    if spacing is None:
        return None
    try:
        row, col = float(spacing[0]), float(spacing[1])
    except (TypeError, ValueError, IndexError):
        raise SegSourceError(f"source DICOM PixelSpacing {spacing!r} is not two numbers (row, column) in mm") from None
    if not (row > 0 and col > 0):
        raise SegSourceError(f"source DICOM PixelSpacing {spacing!r} must be positive (row, column) in mm")
    thickness = measures.get("SliceThickness")
    thickness = float(thickness) if thickness not in (None, "") and float(thickness) > 0 else min(row, col)
    between = measures.get("SpacingBetweenSlices")
    return hd.PixelMeasuresSequence(
        pixel_spacing=[row, col],
        slice_thickness=thickness,
        spacing_between_slices=None if between in (None, "") else float(between),
    )


def _frame_geometry(prepared: pydicom.Dataset, frame_index: int, frames: int) -> dict[str, object]:
    """highdicom keyword arguments placing a one-frame SEG on frame ``frame_index`` of a multi-frame source.

    With a frame of reference, the frame's plane position (per-frame functional groups) lets highdicom
    find the source frame itself. Without one, highdicom only accepts a single-frame source, so the
    caller builds from a one-frame view and writes ReferencedFrameNumber afterwards.
    """
    if frames == 1 or "FrameOfReferenceUID" not in prepared:
        return {}
    position = _functional_group(prepared, frame_index, "PlanePositionSequence")
    orientation = _functional_group(prepared, frame_index, "PlaneOrientationSequence")
    if position is None or orientation is None:
        raise SegSourceError(
            f"source DICOM has {frames} frames and a frame of reference but no per-frame PlanePositionSequence/"
            "PlaneOrientationSequence (functional groups); cannot place the SEG on one frame"
        )
    return {
        "plane_positions": [hd.PlanePositionSequence(hd.CoordinateSystemNames.PATIENT,
                                                     position.ImagePositionPatient)],
        "plane_orientation": hd.PlaneOrientationSequence(hd.CoordinateSystemNames.PATIENT,
                                                         orientation.ImageOrientationPatient),
    }


# Secondary Capture: the SOP class a one-frame view of a multi-frame source without a frame of reference
# wears while highdicom builds the SEG (its multi-frame classes need functional groups such a source lacks).
_SINGLE_FRAME_STAND_IN = "1.2.840.10008.5.1.4.1.1.7"


def _refer_to_frame(seg: hd.seg.Segmentation, source: pydicom.Dataset, frame_number: int) -> None:
    """Point the SEG built from a one-frame view back at ``source`` itself, frame ``frame_number`` (1-based)."""
    for series in seg.ReferencedSeriesSequence:
        for instance in series.ReferencedInstanceSequence:
            if instance.ReferencedSOPInstanceUID == source.SOPInstanceUID:
                instance.ReferencedSOPClassUID = source.SOPClassUID
    for item in seg.PerFrameFunctionalGroupsSequence[0].DerivationImageSequence[0].SourceImageSequence:
        item.ReferencedSOPClassUID = source.SOPClassUID
        item.ReferencedFrameNumber = frame_number


def build_dicom_seg(
    source: pydicom.Dataset,
    mask: np.ndarray,
    *,
    model_version: str,
    frame_index: int | None = None,
    anonymize: bool = False,
    algorithm_name: str = "medrefine UltraRefiner",
    segment_label: str = "Lesion",
    series_number: int = 900,
    series_description: str = "medrefine lesion segmentation",
    manufacturer: str = "medrefine",
    software_version: str = "0.1.0",
) -> bytes:
    """Encode ``mask`` as a DICOM SEG instance derived from ``source`` (one frame of it).

    The SEG has the source's Rows/Columns and, where the source has one, its PixelSpacing (in the
    shared Pixel Measures), and reads back with pydicom and highdicom ``Segmentation.from_dataset``.

    Args:
        source: the image instance the mask was predicted on (as read by pydicom); single- or multi-frame,
            any photometric interpretation (the SEG itself is BINARY, MONOCHROME2).
        mask: (Rows, Columns) uint8/bool {0, 1} in the source's pixel frame.
        model_version: the served model version (the artifact manifest's version), recorded as the
            algorithm version.
        frame_index: 0-based frame of a multi-frame source the mask belongs to; default the middle
            frame, the one :func:`core.imageio.decode_image` decodes by default. Referenced as
            ReferencedFrameNumber ``frame_index + 1``.
        anonymize: remove patient identifiers from the written object (UIDs are kept).
        algorithm_name, segment_label, series_number, series_description, manufacturer,
        software_version: written as given.

    Returns:
        The SEG as a DICOM Part 10 file (bytes, explicit VR little endian).

    Raises:
        SegSourceError: the source lacks identifying UIDs or usable geometry (an ``InputError``).
        ValueError: ``frame_index`` is out of range, or the mask's shape or values do not match.
    """
    frames = _frame_count(source)
    if frame_index is None:
        frame_index = frames // 2
    if not 0 <= frame_index < frames:
        raise ValueError(f"frame_index {frame_index} is out of range for a source with {frames} frame(s)")
    mask = np.asarray(mask)
    expected = (int(source.Rows), int(source.Columns)) if "Rows" in source and "Columns" in source else None
    if mask.ndim != 2 or (expected is not None and mask.shape != expected):
        raise ValueError(f"mask shape {mask.shape} does not match the source image (Rows, Columns) = {expected}")
    if mask.dtype != np.bool_ and not np.isin(mask, (0, 1)).all():
        raise ValueError(f"mask must hold only 0 and 1, got values in [{mask.min()}, {mask.max()}]")
    prepared = _prepared_source(source, anonymize)
    geometry = _frame_geometry(prepared, frame_index, frames)
    pixel_measures = _pixel_measures(prepared, frame_index)
    if frames == 1 and pixel_measures is not None and "SliceThickness" not in prepared:
        # highdicom reads it from a single-frame source with a frame of reference; the same nominal value
        prepared.SliceThickness = pixel_measures[0].SliceThickness
    one_frame_view = frames > 1 and not geometry
    if one_frame_view:  # no frame of reference: highdicom takes a single-frame image only; see _refer_to_frame
        prepared.NumberOfFrames = 1
        prepared.SOPClassUID = _SINGLE_FRAME_STAND_IN

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
    try:
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
            pixel_measures=pixel_measures,
            omit_empty_frames=False,  # an empty prediction is still a result worth storing
            **geometry,
        )
    except AttributeError as exc:  # highdicom reads the source's geometry; pydicom names what is missing
        raise SegSourceError(f"source DICOM lacks geometry a SEG needs: {exc}") from None
    if one_frame_view:
        _refer_to_frame(seg, source, frame_index + 1)
    if anonymize:
        _blank_identifiers(seg)
        seg.PatientIdentityRemoved = "YES"
        seg.DeidentificationMethod = "medrefine: patient identifiers removed, UIDs retained"
    buffer = io.BytesIO()
    seg.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()
