"""Reading a folder of DICOM files into manifest rows (the ``dicom`` layout), with every identifier left behind.

Files are found recursively: ``*.dcm`` / ``*.dicom``, and files without an extension that start as DICOM does
(PACS exports name files ``IM0001`` or by UID). Labels come from class folders (``<root>/<class>/...``, or
``<root>/<split>/<class>/...``) or from ``data.dicom.labels_file``, keyed by path or by a DICOM attribute.

Nothing that could identify a patient reaches a record: the manifest names each image by a keyed pseudonym of its
path (``<pseudonym>.png``: PACS file names can hold names or accession numbers), the group column holds a
pseudonym of the patient ID, so one patient never spans two splits (:mod:`cass.data.pseudonyms`), and the table
of attributes beside the images (``dicom.csv``: modality, manufacturer, sex, age band, photometric
interpretation, spacing, size...) holds no name, ID, UID or date. Preparation decodes each file once through
:func:`cass.data.dicom.decode_dicom` to an 8-bit PNG under the work folder, named by the pseudonym and by a hash of
the pixel settings (so a change of window never overwrites the images a previous preparation made). Messages name
a faulty file by its path relative to the data root (the person who runs the command must find it) and a labels
CSV row by its line number, never by an attribute value.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING

import pandas as pd

from cass.data.adapters import SPLIT_ALIASES, AdapterResult, read_csv_file
from cass.data.dicom import MAGIC, PREAMBLE, Header, check_dataset, decode_dicom, frames, header, read_dataset
from cass.data.image_errors import ImageError
from cass.data.images import read_bytes
from cass.data.problems import Problems
from cass.data.pseudonyms import pseudonym, pseudonym_key
from cass.errors import DataError
from cass.io import atomic_write_text

if TYPE_CHECKING:
    from cass.config import DataConfig

log = logging.getLogger(__name__)

DICOM_TABLE = "dicom.csv"
"""The record-safe attributes of each image, beside the extracted images (info.root): read by the gate, subgroups."""
EXTENSIONS = (".dcm", ".dicom")
NO_CLASS = "DICOM file outside a class folder"
NO_LABEL = "DICOM file without a label"
LABEL_ROWS = "labels file row"
NO_FILES = "no DICOM files"


def _is_dicom_file(path: Path) -> bool:
    if path.suffix.lower() in EXTENSIONS:
        return True
    if path.suffix:
        return False
    try:
        with open(path, "rb") as fh:
            return fh.read(PREAMBLE + 4)[PREAMBLE:] == MAGIC
    except OSError:
        return False


def find_files(root: Path, skip: Path | None = None) -> list[str]:
    """Every DICOM file under ``root`` (hidden folders skipped), as POSIX paths relative to it, sorted."""
    found = []
    for p in sorted(root.rglob("*")):
        rel = p.relative_to(root)
        if p.is_file() and not any(part.startswith(".") for part in rel.parts) and p != skip and _is_dicom_file(p):
            found.append(rel.as_posix())
    return found


def _folder_labels(rel: str, problems: Problems) -> tuple[str, str] | None:
    """(label, split) from ``<class>/...`` or ``<split>/<class>/...``."""
    parts = rel.split("/")
    if len(parts) >= 3 and parts[0].lower() in SPLIT_ALIASES:
        return parts[1], SPLIT_ALIASES[parts[0].lower()]
    if len(parts) >= 2 and parts[0].lower() not in SPLIT_ALIASES:
        return parts[0], ""
    problems.add(NO_CLASS, f"{rel}: not inside a class folder",
                 "put each file under <root>/<class>/ (or <root>/<split>/<class>/), or set data.dicom.labels_file")
    return None


def _labels_table(root: Path, data: DataConfig, problems: Problems) -> dict[str, str]:
    """labels_key value -> label. Faulty rows are named by their line, never by their (possibly identifying) key."""
    cfg = data.dicom
    path = root / str(cfg.labels_file)
    table = read_csv_file(path, "data.dicom.labels_file", "labels file")
    missing = [c for c in (cfg.labels_key, cfg.labels_column) if c not in table.columns]
    if missing:
        raise DataError(f"{path}: no column(s) {missing} (data.dicom.labels_key / labels_column); columns are "
                        f"{list(table.columns)}")
    out: dict[str, str] = {}
    for i, (key, label) in enumerate(zip(table[cfg.labels_key].str.strip(), table[cfg.labels_column].str.strip(),
                                         strict=True)):
        if not key or not label:
            problems.add(LABEL_ROWS, f"{path.name} line {i + 2}: empty {'key' if not key else 'label'}",
                         "fill in every key and label, or remove the row")
        elif key in out and out[key] != label:
            problems.add(LABEL_ROWS, f"{path.name} line {i + 2}: a key listed before with another label",
                         "keep one label per key")
        else:
            out[key] = label
    return out


def settings_hash(data: DataConfig) -> str:
    """Which pixel settings made the extracted images (the folder they go to)."""
    return hashlib.sha256(json.dumps(data.dicom.model_dump(mode="json"), sort_keys=True).encode()).hexdigest()[:12]


def dicom_folder(data: DataConfig, work_dir: Path | None, problems: Problems) -> AdapterResult:
    """The rows of a DICOM folder. Every file is parsed and checked (pixel data, image SOP class, a decodable
    transfer syntax, frames, length); with ``work_dir`` each is also decoded to ``<work_dir>/images-<settings>/``
    and the rows name those images, without it (``cass data add``) nothing is decoded or written."""
    root = Path(data.root)
    if not root.is_dir():
        raise DataError(f"{root}: data folder not found (data.root)")
    key = pseudonym_key()
    cfg = data.dicom
    labels_path = root / cfg.labels_file if cfg.labels_file else None
    files = find_files(root, labels_path)
    if not files:
        raise DataError(f"{root}: no DICOM files (*.dcm, *.dicom, or files without extension starting as DICOM)")
    by_key = _labels_table(root, data, problems) if labels_path else None
    out_root = work_dir / f"images-{settings_hash(data)}" if work_dir is not None else root
    records: list[tuple[str, str, str, str]] = []
    table: list[dict[str, str]] = []
    no_patient = 0
    for rel in files:
        try:
            raw = read_bytes(root / rel, rel)
            ds = read_dataset(raw, rel)
            check_dataset(ds, rel, data.max_image_pixels, cfg.frame if frames(ds) > 1 else None)
            head: Header = header(ds)
            if by_key is None:
                found = _folder_labels(rel, problems)
            else:
                value = rel if cfg.labels_key == "path" else str(ds.get(cfg.labels_key, "") or "").strip()
                label = by_key.get(value)
                found = (label, "") if label else None
                if found is None:
                    problems.add(NO_LABEL, f"{rel}: its {cfg.labels_key} is not in {cfg.labels_file}",
                                 f"add a row for it to data.dicom.labels_file (column {cfg.labels_key}) or remove it")
            if found is None:
                continue
            image = pseudonym(rel, "image", key)
            name = f"{image}.png"
            if work_dir is not None:
                target = out_root / name
                target.parent.mkdir(parents=True, exist_ok=True)
                tmp = target.with_suffix(".tmp.png")
                decode_dicom(raw, rel, data.max_image_pixels, cfg).save(tmp)
                tmp.replace(target)
        except ImageError as exc:
            problems.add(exc.kind, str(exc))
            continue
        if not head.patient_id:
            no_patient += 1
        group = pseudonym(head.patient_id, "patient", key) if head.patient_id else image
        records.append((name if work_dir is not None else rel, found[0], found[1], group))
        table.append({"path": name, **head.attributes})
    if no_patient:
        log.warning("%d DICOM file(s) have no PatientID; each is its own split group", no_patient)
    burned = sum(1 for row in table if row.get("BurnedInAnnotation", "").upper() == "YES")
    if burned:
        log.warning("%d image(s) flag burned-in annotations (BurnedInAnnotation YES): their pixels may show patient "
                    "text; the data gate lists them (dicom_no_burned_in_annotation)", burned)
    classes = sorted({r[1] for r in records})
    if len(classes) < 2 and not problems:
        problems.add(NO_FILES, f"{root}: {len(classes)} class(es) among the DICOM files; classification needs 2")
    rows = pd.DataFrame(records, columns=["path", "labels", "split", "group"])
    if work_dir is not None and not problems:
        atomic_write_text(out_root / DICOM_TABLE, pd.DataFrame(table).to_csv(index=False))
    return AdapterResult(rows, tuple(classes), False, out_root)


def read_dicom_table(image_root: Path) -> pd.DataFrame:
    """The attributes table prepared beside the images (``info.root``), as text."""
    path = Path(image_root) / DICOM_TABLE
    if not path.is_file():
        raise DataError(f"{path}: not found; run `cass data prepare` again")
    return pd.read_csv(path, dtype=str, keep_default_na=False)
