"""Names the DICOM settings are checked against: the VOI window presets and the subgroup attributes.

Kept apart from :mod:`cass.data.dicom` (numpy, Pillow, pydicom) so that loading the settings stays quick.
"""

from __future__ import annotations

# Named VOI windows (centre, width) in Hounsfield units, as radiology viewers offer them.
WINDOW_PRESETS: dict[str, tuple[float, float]] = {
    "brain": (40.0, 80.0),
    "subdural": (75.0, 215.0),
    "stroke": (40.0, 40.0),
    "soft_tissue": (50.0, 400.0),
    "mediastinum": (50.0, 350.0),
    "abdomen": (60.0, 400.0),
    "liver": (60.0, 160.0),
    "lung": (-600.0, 1500.0),
    "bone": (400.0, 1800.0),
}
DICOM_SUBGROUPS = ("Modality", "Manufacturer", "ManufacturerModelName", "PatientSex", "age_band", "BodyPartExamined")
"""DICOM attributes ``data.group_columns`` may name for subgroup metrics (cass.data.dicom); none names a patient."""
