"""Dataset layouts -> manifest rows.

Each adapter returns rows with ``path``, ``labels``, ``split`` (predefined split or empty) and
``group``, plus the class list. Hashes, sizes and modes are added afterwards by
:func:`cass.data.prepare.prepare_data`, the same way for every layout.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from cass.config import CsvLayout
from cass.data.images import IMAGE_EXTENSIONS
from cass.data.manifest import LABEL_SEP
from cass.errors import DataError
from cass.io import atomic_write_text

log = logging.getLogger(__name__)

# Folder names that mark a predefined split (Brain Tumor MRI ships Training/ and Testing/).
SPLIT_ALIASES = {
    "train": "train", "training": "train",
    "val": "val", "valid": "val", "validation": "val",
    "test": "test", "testing": "test",
}


@dataclass(frozen=True)
class AdapterResult:
    rows: pd.DataFrame  # path, labels, split, group
    classes: tuple[str, ...]
    multilabel: bool
    root: Path  # the folder that `path` is relative to


def _inside(root: Path, rel: str) -> bool:
    resolved = (root / rel).resolve()
    return resolved == root.resolve() or root.resolve() in resolved.parents


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


def imagefolder(root: Path) -> AdapterResult:
    """``root/<class>/*.png`` or, with predefined splits, ``root/<Training|Testing|...>/<class>/*``."""
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
            raise DataError(f"{folder}: no class folders found; expected {folder}/<class>/<image files>")
        for cdir in classes:
            files = _images_in(cdir, root)
            if not files:
                raise DataError(f"{cdir}: empty class folder (no image files); add images or remove the folder")
            class_names.add(cdir.name)
            records.extend((f, cdir.name, split) for f in files)
    if len(class_names) < 2:
        raise DataError(f"{root}: found {len(class_names)} class folder(s); classification needs at least 2")
    rows = pd.DataFrame(records, columns=["path", "labels", "split"])
    rows["group"] = ""
    return AdapterResult(rows, tuple(sorted(class_names)), False, root)


# --------------------------------------------------------------------------------------------------
# CSV with one-hot label columns (ISIC 2019 ground truth)


def csv_onehot(root: Path, layout: CsvLayout, group_column: str | None = None) -> AdapterResult:
    csv_path = root / layout.file
    if not csv_path.is_file():
        raise DataError(f"{csv_path}: CSV file not found (data.csv.file is relative to data.root)")
    try:
        table = pd.read_csv(csv_path, dtype=str, keep_default_na=False)
    except (pd.errors.ParserError, UnicodeDecodeError) as exc:
        raise DataError(f"{csv_path}: not a readable CSV ({exc})") from None
    if layout.image_column not in table.columns:
        raise DataError(
            f"{csv_path}: no image column '{layout.image_column}'; columns are {list(table.columns)} "
            "(set data.csv.image_column)"
        )
    if group_column and group_column not in table.columns:
        raise DataError(f"{csv_path}: no group column '{group_column}' (data.group_column)")
    if layout.label_columns is not None:
        missing = [c for c in layout.label_columns if c not in table.columns]
        if missing:
            raise DataError(f"{csv_path}: label columns {missing} not found; columns are {list(table.columns)}")
        label_cols = list(layout.label_columns)
    else:
        label_cols = [c for c in table.columns if c not in {layout.image_column, group_column}]
    label_cols = [c for c in label_cols if c not in layout.drop_columns]
    if len(label_cols) < 2:
        raise DataError(f"{csv_path}: needs at least 2 one-hot label columns, found {label_cols}")

    onehot = np.zeros((len(table), len(label_cols)), dtype=np.int8)
    problems: list[str] = []
    for j, col in enumerate(label_cols):
        values = table[col].str.strip()
        as_float = pd.to_numeric(values, errors="coerce")
        bad = ~as_float.isin([0.0, 1.0])
        for i in np.flatnonzero(bad.to_numpy())[:5]:
            problems.append(f"row {i + 2}, column {col}: value {values.iloc[i]!r} is not 0 or 1")
        onehot[:, j] = (as_float == 1.0).to_numpy()
    counts = onehot.sum(axis=1)
    for i in np.flatnonzero(counts == 0)[:5]:
        problems.append(f"row {i + 2} ({table[layout.image_column].iloc[i]}): no label (every label column is 0)")
    if not layout.multilabel:
        for i in np.flatnonzero(counts > 1)[:5]:
            names = [label_cols[j] for j in np.flatnonzero(onehot[i])]
            problems.append(
                f"row {i + 2} ({table[layout.image_column].iloc[i]}): {len(names)} labels {names} in a "
                "single-label dataset (set data.csv.multilabel: true if that is intended)"
            )

    paths: list[str] = []
    for i, image_id in enumerate(table[layout.image_column].str.strip()):
        if not image_id:
            problems.append(f"row {i + 2}: empty image id")
            paths.append("")
            continue
        rel = (Path(layout.image_dir) / f"{image_id}{layout.extension}").as_posix()
        if Path(rel).is_absolute() or not _inside(root, rel):
            problems.append(f"row {i + 2}: path {rel!r} escapes the data root {root}; paths must stay inside it")
        paths.append(rel)
    if problems:
        raise DataError(f"{csv_path}: {len(problems)} problem(s):\n  - " + "\n  - ".join(problems[:20]))

    labels = [LABEL_SEP.join(label_cols[j] for j in np.flatnonzero(r)) for r in onehot]
    rows = pd.DataFrame({"path": paths, "labels": labels, "split": ""})
    rows["group"] = table[group_column].str.strip() if group_column else ""
    used = sorted({c for i, c in enumerate(label_cols) if onehot[:, i].any()}, key=label_cols.index)
    unused = [c for c in label_cols if c not in used]
    if unused:
        log.warning("%s: label column(s) %s have no positive row; they are not classes here", csv_path, unused)
    return AdapterResult(rows, tuple(used), layout.multilabel, root)


# --------------------------------------------------------------------------------------------------
# MedMNIST .npz


def medmnist(npz_path: Path, out_dir: Path, classes: tuple[str, ...] | None = None) -> AdapterResult:
    """Extract a MedMNIST ``.npz`` (``{train,val,test}_{images,labels}``) to PNG files under ``out_dir``."""
    if not npz_path.is_file():
        raise DataError(f"{npz_path}: MedMNIST file not found (data.medmnist_file is relative to data.root)")
    try:
        npz = np.load(npz_path, allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise DataError(f"{npz_path}: not a readable .npz file ({exc})") from None
    with npz:
        missing = [f"{s}_{k}" for s in ("train", "val", "test") for k in ("images", "labels") if f"{s}_{k}" not in npz]
        if missing:
            raise DataError(f"{npz_path}: missing arrays {missing}; expected MedMNIST's train/val/test arrays")
        arrays = {s: (npz[f"{s}_images"], npz[f"{s}_labels"]) for s in ("train", "val", "test")}
    width = arrays["train"][1].reshape(len(arrays["train"][1]), -1).shape[1]
    all_labels = np.concatenate([lab.reshape(len(lab), -1) for _, lab in arrays.values()])
    multilabel = width > 1
    n_classes = width if multilabel else int(all_labels.max()) + 1
    if classes is not None and len(classes) != n_classes:
        raise DataError(f"{npz_path}: {n_classes} classes in the labels but data.classes lists {len(classes)}")
    names = tuple(classes) if classes else tuple(str(i) for i in range(n_classes))

    image_root = out_dir / "images"
    records = []
    for split, (images, labels) in arrays.items():
        if images.dtype != np.uint8 or images.ndim not in (3, 4):
            raise DataError(
                f"{npz_path}: {split}_images must be uint8 (N,H,W) or (N,H,W,3), got {images.dtype} {images.shape}"
            )
        labels = labels.reshape(len(labels), -1)
        for i, (img, lab) in enumerate(zip(images, labels, strict=True)):
            rel = f"{split}/{i:06d}.png"
            target = image_root / rel
            if not target.exists():
                target.parent.mkdir(parents=True, exist_ok=True)
                tmp = target.with_suffix(".tmp.png")
                Image.fromarray(img).save(tmp)
                tmp.replace(target)
            if multilabel:
                lab_names = [names[j] for j in np.flatnonzero(lab)]
            else:
                idx = int(lab[0])
                if not 0 <= idx < n_classes:
                    raise DataError(f"{npz_path}: {split}_labels[{i}] = {idx} is not a class index")
                lab_names = [names[idx]]
            records.append((rel, LABEL_SEP.join(lab_names), split))
    rows = pd.DataFrame(records, columns=["path", "labels", "split"])
    rows["group"] = ""
    atomic_write_text(image_root / "SOURCE.txt", f"extracted from {npz_path}\n")
    return AdapterResult(rows, names, multilabel, image_root)
