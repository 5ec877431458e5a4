"""Strip patient identifiers from a DICOM file at dataset ingest (pydicom); pixels, geometry and UIDs stay."""

from __future__ import annotations

import io

# DICOM PS3.15 Basic Application Level Confidentiality Profile, the patient / study / equipment subset.
PATIENT_IDENTIFIER_KEYWORDS = (
    "PatientName", "PatientID", "PatientBirthDate", "PatientBirthTime", "PatientSex", "PatientAge",
    "PatientSize", "PatientWeight", "PatientAddress", "PatientTelephoneNumbers", "PatientMotherBirthName",
    "PatientComments", "PatientBirthName", "OtherPatientIDs", "OtherPatientIDsSequence", "OtherPatientNames",
    "IssuerOfPatientID", "IssuerOfPatientIDQualifiersSequence", "EthnicGroup", "MedicalRecordLocator",
    "AdditionalPatientHistory", "ResponsiblePerson", "AccessionNumber", "StudyID", "StudyDate", "StudyTime",
    "ReferringPhysicianName", "InstitutionName", "InstitutionAddress", "StationName", "OperatorsName",
    "PerformingPhysicianName", "NameOfPhysiciansReadingStudy",
    # beyond the SEG writer's list: dates and free text that identify a visit or a person
    "SeriesDate", "SeriesTime", "AcquisitionDate", "AcquisitionTime", "ContentDate", "ContentTime",
    "AcquisitionDateTime", "InstitutionalDepartmentName", "PhysiciansOfRecord", "RequestingPhysician",
    "DeviceSerialNumber", "PatientInsurancePlanCodeSequence", "MilitaryRank", "BranchOfService",
    "CountryOfResidence", "RegionOfResidence", "Occupation", "PatientReligiousPreference",
    "ImageComments", "StudyDescription", "RequestAttributesSequence",
)
# Type 2 in the Patient and General Study modules: kept present but emptied, so the file stays conformant.
TYPE2_KEYWORDS = frozenset({"PatientName", "PatientID", "PatientBirthDate", "PatientSex", "AccessionNumber",
                            "StudyID", "StudyDate", "StudyTime", "ReferringPhysicianName"})
METHOD = "medrefine ingest: identifiers, names, private tags removed"  # LO: at most 64 characters


def deidentify_dicom(data: bytes) -> bytes:
    """Return ``data`` (a DICOM Part-10 file) without patient identifiers.

    Every attribute in :data:`PATIENT_IDENTIFIER_KEYWORDS` is removed (type 2 ones emptied), every person
    name (VR PN) anywhere in the file is emptied, private tags are removed, and PatientIdentityRemoved is
    YES. Pixel data, geometry and UIDs are unchanged. Identifiers burnt into the pixels are not detected.

    Raises:
        ValueError: the bytes are not a readable DICOM file.
    """
    import pydicom
    from pydicom.errors import InvalidDicomError

    try:
        dataset = pydicom.dcmread(io.BytesIO(data))
    except (InvalidDicomError, OSError, ValueError, EOFError) as exc:
        raise ValueError(f"not a readable DICOM file ({exc})") from None
    for keyword in PATIENT_IDENTIFIER_KEYWORDS:
        if keyword in TYPE2_KEYWORDS:
            setattr(dataset, keyword, "")
        elif keyword in dataset:
            delattr(dataset, keyword)

    def _blank_person_names(ds: pydicom.Dataset, element: pydicom.DataElement) -> None:
        if element.VR == "PN":
            element.value = ""

    dataset.walk(_blank_person_names)
    dataset.remove_private_tags()
    dataset.PatientIdentityRemoved = "YES"
    dataset.DeidentificationMethod = METHOD
    buffer = io.BytesIO()
    dataset.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()
