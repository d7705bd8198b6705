"""Reading each dataset layout into manifest rows: the code behind the registered layouts (cass.data.layouts).

Each adapter returns rows with ``path``, ``labels``, ``split`` (predefined split or empty) and ``group``,
plus the class list, without decoding any image: hashes, sizes and modes are added afterwards by
:func:`cass.data.prepare.prepare_data`, the same way for every layout. A fault of one row, folder or file
is added to a :class:`~cass.data.problems.Problems`, so one pass reports them all; a fault that leaves
nothing to read (no folder, no CSV, no image column) raises at once. Without a ``problems`` argument an
adapter raises its own problems at the end.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
from PIL import Image

from cass.data.images import IMAGE_EXTENSIONS
from cass.data.manifest import LABEL_SEP
from cass.data.problems import Problems
from cass.errors import DataError
from cass.io import atomic_write_text

if TYPE_CHECKING:
    from cass.config import CsvLayout

log = logging.getLogger(__name__)

# Folder names that mark a predefined split (Brain Tumor MRI ships Training/ and Testing/).
SPLIT_ALIASES = {
    "train": "train", "training": "train",
    "val": "val", "valid": "val", "validation": "val",
    "test": "test", "testing": "test",
}

# Kinds of problem, as reports group them.
EMPTY_CLASS = "empty class folder"
NO_CLASSES = "no class folders"
TOO_FEW_CLASSES = "fewer than 2 classes"
NO_LABEL = "no label"
BAD_VALUE = "label value not 0 or 1"
EMPTY_CELL = "empty label cell"
SEVERAL_LABELS = "several labels in a single-label dataset"
EMPTY_ID = "empty image id"
DUPLICATE_ID = "duplicate image id"
ESCAPES = "path outside the data root"
MISSING = "file not found"
BAD_CLASS_INDEX = "label that is not a class index"

DEFAULT_EXTENSION = ".jpg"  # ISIC's; used by data.csv.extension: auto for ids without an image extension


@dataclass(frozen=True)
class AdapterResult:
    rows: pd.DataFrame  # path, labels, split, group
    classes: tuple[str, ...]
    multilabel: bool
    root: Path  # the folder that `path` is relative to


def _inside(root: Path, rel: str) -> bool:
    resolved = (root / rel).resolve()
    return resolved == root.resolve() or root.resolve() in resolved.parents


def _finish(problems: Problems, own: bool, where: Path) -> None:
    if own:
        problems.raise_if_any(f"{where}: the dataset cannot be read")


# --------------------------------------------------------------------------------------------------
# ImageFolder


def _class_dirs(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


def _images_in(class_dir: Path, root: Path) -> list[str]:
    files, skipped = [], []
    for p in sorted(class_dir.rglob("*")):
        if not p.is_file() or any(part.startswith(".") for part in p.relative_to(root).parts):
            continue
        (files if p.suffix.lower() in IMAGE_EXTENSIONS else skipped).append(p.relative_to(root).as_posix())
    if skipped:
        log.warning("skipped %d non-image file(s) in %s, e.g. %s", len(skipped), class_dir, skipped[:3])
    return files


def imagefolder(root: Path, problems: Problems | None = None) -> AdapterResult:
    """``root/<class>/*.png`` or, with predefined splits, ``root/<Training|Testing|...>/<class>/*``."""
    own, problems = problems is None, problems if problems is not None else Problems()
    if not root.is_dir():
        raise DataError(f"{root}: data folder not found; generate the demo (`cass data demo`) or set data.root")
    top = _class_dirs(root)
    split_dirs = {d: SPLIT_ALIASES[d.name.lower()] for d in top if d.name.lower() in SPLIT_ALIASES}
    if split_dirs and len(split_dirs) != len(top):
        others = [d.name for d in top if d not in split_dirs]
        raise DataError(
            f"{root}: mixes split folders ({', '.join(d.name for d in split_dirs)}) with other folders "
            f"({', '.join(others)}); use either <split>/<class>/ or <class>/ throughout"
        )
    groups = list(split_dirs.items()) if split_dirs else [(root, "")]
    records: list[tuple[str, str, str]] = []
    class_names: set[str] = set()
    for folder, split in groups:
        classes = _class_dirs(folder)
        if not classes:
            problems.add(NO_CLASSES, f"{folder}: no class folders", f"expected {folder}/<class>/<image files>")
            continue
        for cdir in classes:
            files = _images_in(cdir, root)
            if not files:
                problems.add(EMPTY_CLASS, f"{cdir}: empty class folder (no image files)",
                             "add images or remove the folder")
                continue
            class_names.add(cdir.name)
            records.extend((f, cdir.name, split) for f in files)
    if len(class_names) < 2:
        problems.add(TOO_FEW_CLASSES, f"{root}: found {len(class_names)} class folder(s) with images",
                     "classification needs at least 2")
    _finish(problems, own, root)
    rows = pd.DataFrame(records, columns=["path", "labels", "split"])
    rows["group"] = ""
    return AdapterResult(rows, tuple(sorted(class_names)), False, root)


# --------------------------------------------------------------------------------------------------
# CSV with one-hot label columns (ISIC 2019 ground truth)


def image_file_name(image_id: str, extension: str) -> str:
    """The file name of an image id: ``extension`` appended; ``auto``: nothing when the id already ends in an
    image extension (``x.png``), else ``.jpg`` (ISIC's ids carry none)."""
    if extension == "auto":
        return image_id if Path(image_id).suffix.lower() in IMAGE_EXTENSIONS else image_id + DEFAULT_EXTENSION
    return image_id + extension


def _strip_column_names(table: pd.DataFrame, csv_path: Path) -> pd.DataFrame:
    """Column names with surrounding spaces (``MEL ``) would become class names with spaces: strip, and say so."""
    stripped = [str(c).strip() for c in table.columns]
    changed = [str(c) for c, s in zip(table.columns, stripped, strict=True) if str(c) != s]
    if not changed:
        return table
    if len(set(stripped)) != len(stripped):
        raise DataError(f"{csv_path}: column names {changed} collide once their spaces are stripped; rename them")
    log.warning("%s: stripped the spaces around column names %s", csv_path, changed)
    return table.set_axis(stripped, axis=1)


def _where(i: int, image_id: str) -> str:
    """A CSV row as a spreadsheet shows it: line 1 is the header, so data row ``i`` is line ``i + 2``."""
    return f"row {i + 2} ({image_id})" if image_id else f"row {i + 2}"


def _check_values(
    values: pd.DataFrame, ids: list[str], label_cols: list[str], multilabel: bool, problems: Problems
) -> np.ndarray:
    """The one-hot matrix; every bad cell reported once per row (not once per column), with its row."""
    as_num = values.apply(pd.to_numeric, errors="coerce")
    empty = (values == "").to_numpy()
    bad = (~as_num.isin([0.0, 1.0])).to_numpy() & ~empty
    onehot = (as_num == 1.0).to_numpy().astype(np.int8)
    counts = onehot.sum(axis=1)
    for i in np.flatnonzero(bad.any(axis=1) | empty.any(axis=1) | (counts == 0) | ((counts > 1) & (not multilabel))):
        where = _where(int(i), ids[i])
        if empty[i].all():
            problems.add(NO_LABEL, f"{where}: no label (every label cell is empty)",
                         "give each row a 1 in its label column(s), or remove the row")
            continue
        if bad[i].any():
            cells = ", ".join(f"{label_cols[j]} = {values.iat[i, j]!r}" for j in np.flatnonzero(bad[i]))
            problems.add(BAD_VALUE, f"{where}: {cells}", "write 0 or 1 (0.0 and 1.0 are fine) in every label column")
        if empty[i].any():
            cols = [label_cols[j] for j in np.flatnonzero(empty[i])]
            problems.add(EMPTY_CELL, f"{where}: empty cell(s) in {cols}", "write 0 or 1 in every label column")
        if bad[i].any() or empty[i].any():
            continue
        if counts[i] == 0:
            problems.add(NO_LABEL, f"{where}: no label (every label column is 0)",
                         "give each row a 1 in its label column(s), or remove the row")
        elif counts[i] > 1 and not multilabel:
            names = [label_cols[j] for j in np.flatnonzero(onehot[i])]
            problems.add(SEVERAL_LABELS, f"{where}: {len(names)} labels {names} in a single-label dataset",
                         "set data.csv.multilabel: true if several labels per image are intended")
    return onehot


def _duplicates(ids: list[str], labels: list[str]) -> dict[str, list[int]]:
    """Image id -> its rows, for ids on more than one row."""
    rows: dict[str, list[int]] = defaultdict(list)
    for i, image_id in enumerate(ids):
        if image_id:
            rows[image_id].append(i)
    return {k: v for k, v in rows.items() if len(v) > 1}


def _missing_remedy(root: Path, layout: CsvLayout, missing: list[tuple[str, str]]) -> str:
    """What to do about missing files; when another data.csv setting finds them, that setting and its value."""
    base = "restore the files (dvc pull?) or remove their rows"
    sample = missing[:50]
    image_dir = root / layout.image_dir
    found: dict[str, list[str]] = defaultdict(list)
    extensions = sorted(IMAGE_EXTENSIONS | {e.upper() for e in IMAGE_EXTENSIONS})
    for image_id, _ in sample:
        if layout.extension not in ("", "auto") and (image_dir / image_id).is_file():
            found["data.csv.extension: ''  (the ids already end in their extension)"].append(image_id)
        for ext in extensions:
            if ext != layout.extension and (image_dir / f"{image_id}{ext}").is_file():
                found[f"data.csv.extension: {ext}"].append(f"{image_id}{ext}")
    if not found:  # elsewhere under the data root?
        names = {Path(rel).name for _, rel in sample}
        for path in root.rglob("*"):
            if path.name in names and path.is_file():
                folder = path.parent.relative_to(root).as_posix()
                found[f"data.csv.image_dir: {folder}"].append(path.relative_to(root).as_posix())
    if not found:
        return base
    setting, examples = max(found.items(), key=lambda kv: len(kv[1]))
    return (
        f"{len(examples)} of the first {len(sample)} missing files are there under another name "
        f"(e.g. {examples[0]}): set {setting}; otherwise {base}"
    )


def read_csv_file(path: Path, setting: str, what: str = "CSV file") -> pd.DataFrame:
    """A CSV read as text (ids keep their leading zeros, empty cells stay ''), or a DataError naming the file,
    ``what`` it is and the ``setting`` (relative to data.root) that points at it."""
    if not path.is_file():
        raise DataError(f"{path}: {what} not found ({setting} is relative to data.root)")
    try:
        return pd.read_csv(path, dtype=str, keep_default_na=False)
    except (pd.errors.ParserError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: not a readable CSV ({exc})") from None


def csv_onehot(
    root: Path, layout: CsvLayout, group_column: str | None = None, problems: Problems | None = None
) -> AdapterResult:
    """A CSV of image ids and one-hot label columns. Every referenced file must exist (checked, not decoded)."""
    own, problems = problems is None, problems if problems is not None else Problems()
    csv_path = root / layout.file
    table = read_csv_file(csv_path, "data.csv.file")
    table = _strip_column_names(table, csv_path)
    if layout.image_column not in table.columns:
        raise DataError(
            f"{csv_path}: no image column '{layout.image_column}'; columns are {list(table.columns)} "
            "(set data.csv.image_column)"
        )
    if group_column and group_column not in table.columns:
        raise DataError(f"{csv_path}: no group column '{group_column}'; columns are {list(table.columns)} "
                        "(data.group_column)")
    if layout.label_columns is not None:
        missing_cols = [c for c in layout.label_columns if c not in table.columns]
        if missing_cols:
            raise DataError(f"{csv_path}: label columns {missing_cols} not found; columns are {list(table.columns)} "
                            "(data.csv.label_columns)")
        label_cols = list(layout.label_columns)
    else:
        label_cols = [c for c in table.columns if c not in {layout.image_column, group_column}]
    label_cols = [c for c in label_cols if c not in layout.drop_columns]
    if len(label_cols) < 2:
        raise DataError(f"{csv_path}: needs at least 2 one-hot label columns, found {label_cols}")

    ids = table[layout.image_column].str.strip().tolist()
    values = table[label_cols].apply(lambda col: col.str.strip())
    onehot = _check_values(values, ids, label_cols, layout.multilabel, problems)
    labels = [LABEL_SEP.join(label_cols[j] for j in np.flatnonzero(r)) for r in onehot]

    repeated = set()
    for image_id, rows in _duplicates(ids, labels).items():
        sets = list(dict.fromkeys(labels[i] or "(none)" for i in rows))
        what = "the same labels" if len(sets) == 1 else "conflicting labels " + " / ".join(sets)
        problems.add(
            DUPLICATE_ID,
            f"rows {', '.join(str(i + 2) for i in rows)}: image id {image_id!r} appears {len(rows)} times ({what})",
            "keep one row per image (where the labels conflict, decide which is right)",
        )
        repeated.update(rows[1:])

    keep: list[int] = []
    paths: list[str] = []
    missing: list[tuple[str, str]] = []
    for i, image_id in enumerate(ids):
        if not image_id:
            problems.add(EMPTY_ID, f"row {i + 2}: empty image id", "fill in the id or remove the row")
            continue
        rel = (Path(layout.image_dir) / image_file_name(image_id, layout.extension)).as_posix()
        if Path(rel).is_absolute() or not _inside(root, rel):
            problems.add(ESCAPES, f"row {i + 2}: path {rel!r} escapes the data root {root}; paths must stay inside it")
            continue
        if not (root / rel).is_file():
            problems.add(MISSING, f"{_where(i, image_id)}: {rel}: file not found")
            missing.append((image_id, rel))
            continue
        if i not in repeated:
            keep.append(i)
            paths.append(rel)
    if missing:
        problems.set_remedy(MISSING, _missing_remedy(root, layout, missing))

    rows = pd.DataFrame({"path": paths, "labels": [labels[i] for i in keep], "split": ""})
    rows["group"] = table[group_column].str.strip().iloc[keep].tolist() if group_column else ""
    used = [c for j, c in enumerate(label_cols) if onehot[:, j].any()]
    unused = [c for c in label_cols if c not in used]
    if unused:
        log.warning("%s: label column(s) %s have no positive row; they are not classes here", csv_path, unused)
    _finish(problems, own, csv_path)
    return AdapterResult(rows, tuple(used), layout.multilabel, root)


# --------------------------------------------------------------------------------------------------
# MedMNIST .npz

MEDMNIST_SPLITS = ("train", "val", "test")


def medmnist(
    npz_path: Path, out_dir: Path | None, classes: tuple[str, ...] | None = None, problems: Problems | None = None
) -> AdapterResult:
    """A MedMNIST ``.npz`` (``{train,val,test}_{images,labels}``).

    With ``out_dir`` the images are extracted to PNG files under it (once; existing files are reused);
    without it only the labels are read (listing a dataset must not write or decode anything), and the rows
    name the files extraction would write.
    """
    own, problems = problems is None, problems if problems is not None else Problems()
    if not npz_path.is_file():
        raise DataError(f"{npz_path}: MedMNIST file not found (data.medmnist_file is relative to data.root)")
    try:
        npz = np.load(npz_path, allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise DataError(f"{npz_path}: not a readable .npz file ({exc})") from None
    with npz:
        missing = [f"{s}_{k}" for s in MEDMNIST_SPLITS for k in ("images", "labels") if f"{s}_{k}" not in npz]
        if missing:
            raise DataError(f"{npz_path}: missing arrays {missing}; expected MedMNIST's train/val/test arrays")
        labels = {s: np.asarray(npz[f"{s}_labels"]) for s in MEDMNIST_SPLITS}
        images = {s: npz[f"{s}_images"] for s in MEDMNIST_SPLITS} if out_dir is not None else {}
    labels = {s: lab.reshape(len(lab), -1) for s, lab in labels.items()}
    width = labels["train"].shape[1]
    multilabel = width > 1
    n_classes = width if multilabel else int(max(lab.max(initial=0) for lab in labels.values())) + 1
    if classes is not None and len(classes) != n_classes:
        raise DataError(f"{npz_path}: {n_classes} classes in the labels but data.classes lists {len(classes)}")
    names = tuple(classes) if classes else tuple(str(i) for i in range(n_classes))

    for split, array in images.items():
        if array.dtype != np.uint8 or array.ndim not in (3, 4):
            raise DataError(
                f"{npz_path}: {split}_images must be uint8 (N,H,W) or (N,H,W,3), got {array.dtype} {array.shape}"
            )
    image_root = (out_dir / "images") if out_dir is not None else npz_path.parent
    records = []
    for split, lab_rows in labels.items():
        for i, lab in enumerate(lab_rows):
            rel = f"{split}/{i:06d}.png"
            if multilabel:
                lab_names = [names[j] for j in np.flatnonzero(lab)]
            else:
                idx = int(lab[0])
                if not 0 <= idx < n_classes:
                    problems.add(BAD_CLASS_INDEX, f"{npz_path}: {split}_labels[{i}] = {idx}",
                                 f"class indices run from 0 to {n_classes - 1}")
                    continue
                lab_names = [names[idx]]
            if split in images:
                target = image_root / rel
                if not target.exists():
                    target.parent.mkdir(parents=True, exist_ok=True)
                    tmp = target.with_suffix(".tmp.png")
                    Image.fromarray(images[split][i]).save(tmp)
                    tmp.replace(target)
            records.append((rel, LABEL_SEP.join(lab_names), split))
    _finish(problems, own, npz_path)
    rows = pd.DataFrame(records, columns=["path", "labels", "split"])
    rows["group"] = ""
    if out_dir is not None:
        atomic_write_text(image_root / "SOURCE.txt", f"extracted from {npz_path}\n")
    return AdapterResult(rows, names, multilabel, image_root)
