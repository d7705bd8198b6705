"""The DICOM checks of the manifest gate: what a DICOM set can get wrong that a folder of PNGs cannot.

They read the attributes table ``cass data prepare`` wrote beside the extracted images (``dicom.csv`` in
``info.root``: no name, ID, UID or date, see :mod:`cass.data.dicom_folder`), keyed by the manifest's pseudonymous
paths, so the report shows nothing that identifies a patient either.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pandas as pd

from cass.config import Params
from cass.data.dicom_folder import read_dicom_table
from cass.data.manifest import DatasetInfo
from cass.quality.gate import Table, check

SPACING_TOLERANCE = 0.25
"""A pixel spacing more than 25 % away from the set's median: another scanner protocol, zoom or field of view."""


def _most_common(values: pd.Series) -> str:
    counted = Counter(v for v in values if v)
    return counted.most_common(1)[0][0] if counted else ""


def _spacing_ratio(spacing: pd.Series) -> list[float | None]:
    """Each image's mean spacing over the median of the set (None without a spacing)."""
    means = [sum(float(x) for x in s.split("\\")) / 2 if s else None for s in spacing]
    known = sorted(m for m in means if m)
    median = known[len(known) // 2] if known else None
    return [m / median if m and median else None for m in means]


def dicom_table(params: Params, df: pd.DataFrame, info: DatasetInfo) -> Table:
    """One row per manifest image with the attributes the checks read."""
    attrs = read_dicom_table(Path(info.root)).set_index("path")
    rows = attrs.reindex(df["path"].astype(str)).fillna("")
    cfg = params.data.dicom
    expected = list(cfg.expected_modalities) or [_most_common(rows["Modality"])]
    size = rows["Rows"].astype(str) + "x" + rows["Columns"].astype(str)
    usual_size = {m: _most_common(size[rows["Modality"] == m]) for m in set(rows["Modality"])}
    frame = pd.DataFrame({
        "path": df["path"].astype(str).to_numpy(),
        "modality": rows["Modality"].to_numpy(),
        "photometric": rows["PhotometricInterpretation"].to_numpy(),
        "pixel_spacing": rows["pixel_spacing"].replace("", None).to_numpy(),
        "spacing_ratio": pd.Series(_spacing_ratio(rows["pixel_spacing"]), dtype="object").to_numpy(),
        "size_matches": [s == usual_size.get(m) for s, m in zip(size, rows["Modality"], strict=True)],
        "burned_in": [str(v).upper() == "YES" for v in rows["BurnedInAnnotation"]],
    })
    low, high = 1 - SPACING_TOLERANCE, 1 + SPACING_TOLERANCE
    checks = (
        # A CT study exported with its scout (DX) or a dose report (OT): another kind of image in the set.
        check("dicom_modality_expected", f"a modality other than {expected} (data.dicom.expected_modalities)",
              "ExpectColumnValuesToBeInSet", column="modality", value_set=expected),
        # YBR or PALETTE COLOR files in a greyscale set (or the reverse): converted, but not what was meant.
        check("dicom_photometric_allowed",
              f"a photometric interpretation outside {list(cfg.allowed_photometric)} (data.dicom.allowed_photometric)",
              "ExpectColumnValuesToBeInSet", column="photometric", value_set=list(cfg.allowed_photometric)),
        # Secondary captures and screenshots carry no spacing: their scale is unknown.
        check("dicom_pixel_spacing_present", "an image without PixelSpacing / ImagerPixelSpacing",
              "ExpectColumnValuesToNotBeNull", column="pixel_spacing"),
        # Another protocol or field of view: a lesion's size in pixels means something else in these images.
        check("dicom_pixel_spacing_consistent",
              f"a pixel spacing more than {SPACING_TOLERANCE:.0%} away from the set's median",
              "ExpectColumnValuesToBeBetween", column="spacing_ratio", min_value=low, max_value=high),
        # Frames of another matrix size than the rest of their modality (a reformat, a localiser, a thumbnail).
        check("dicom_frame_size_consistent",
              "an image whose rows x columns differ from the most common in its modality",
              "ExpectColumnValuesToBeInSet", column="size_matches", value_set=[True]),
        # Burned-in text (names, dates) in the pixels: pseudonyms cannot remove it; review or mask those images.
        check("dicom_no_burned_in_annotation", "an image flagged BurnedInAnnotation YES (text in its pixels)",
              "ExpectColumnValuesToBeInSet", column="burned_in", value_set=[False]),
    )
    return Table("dicom", frame, ("path",), checks)
