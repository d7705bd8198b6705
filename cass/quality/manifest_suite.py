"""The manifest gate, run before any training: files, image properties and labels of every manifest row.

Files are checked as they are now, not as ``cass data prepare`` saw them (they can change, vanish or be
replaced afterwards): each file is read, hashed and, unless its hash is in the decode cache, decoded.
"""

from __future__ import annotations

import posixpath
from collections import defaultdict
from pathlib import Path

import pandas as pd

from cass.config import Params
from cass.data.fingerprint import ensure_prepared
from cass.data.manifest import DatasetInfo, label_lists, read_manifest
from cass.quality.decode_cache import FileCheck, check_files
from cass.quality.gate import GateResult, Table, check, run_gate

CACHE_FILE = "decode-cache.json"


def inside_root(rel: str) -> bool:
    """Whether a manifest path stays inside the data root, judged on the path itself.

    Lexical on purpose: ``..`` and absolute paths are refused, symbolic links are followed, since DVC's
    ``symlink`` cache type makes every data file a link into the cache.
    """
    if not rel or rel.startswith("/") or "\\" in rel:
        return False
    norm = posixpath.normpath(rel)
    return norm != ".." and not norm.startswith("../")


def _conflicts(hashes: list[str], labels: list[list[str]]) -> list[str | None]:
    """For each row, the label sets its content hash carries when there is more than one."""
    seen: dict[str, set[str]] = defaultdict(set)
    for h, ls in zip(hashes, labels, strict=True):
        if h:
            seen[h].add("|".join(sorted(ls)) or "(none)")
    return [" vs ".join(sorted(seen[h])) if h and len(seen[h]) > 1 else None for h in hashes]


def _modes_catch(allowed: list[str], modes: list[str | None]) -> str:
    """What mode_allowed catches; when the data holds other modes, the value of the setting that accepts them."""
    text = f"a pixel mode outside quality.allowed_modes {allowed}"
    extra = sorted({m for m in modes if m and m not in allowed})
    if not extra:
        return text
    wider = ", ".join([*allowed, *extra])
    return (
        f"{text}. Grayscale (L), 16-bit (I;16) or RGBA images are converted to 8-bit RGB faithfully: if the data "
        f"is meant to hold {', '.join(extra)} images, set quality.allowed_modes: [{wider}]"
    )


def images_table(params: Params, df: pd.DataFrame, info: DatasetInfo, checks: list[FileCheck | None]) -> Table:
    q = params.quality
    classes = set(params.data.classes or info.classes)
    labels = label_lists(df)
    unknown = ["|".join(c for c in ls if c not in classes) or None for ls in labels]
    current = [c.sha256 if c and c.sha256 else str(m) for c, m in zip(checks, df["sha256"], strict=True)]
    modes = [c.mode if c else None for c in checks]
    frame = pd.DataFrame(
        {
            "path": df["path"].astype(str).to_numpy(),
            "inside_root": [c is not None for c in checks],
            "exists": [c.exists if c else None for c in checks],
            "decode_error": [c.error if c else None for c in checks],
            "sha256_matches": [
                (c.sha256 == m) if c and c.sha256 and m else None for c, m in zip(checks, df["sha256"], strict=True)
            ],
            "width": pd.Series([c.width if c else None for c in checks], dtype="object"),
            "height": pd.Series([c.height if c else None for c in checks], dtype="object"),
            "mode": modes,
            "num_labels": [len(ls) for ls in labels],
            "unknown_labels": unknown,
            "conflicting_labels": _conflicts(current, labels),
        }
    )
    checks_ = [
        # An empty manifest: nothing would be trained on, every later check would pass vacuously.
        check("rows_present", "an empty manifest", "ExpectTableRowCountToBeBetween", min_value=1),
        # A path with ../ (or absolute): training would read files outside the versioned dataset.
        check("inside_root", "a path that leaves the data root (../ or absolute)", "ExpectColumnValuesToBeInSet",
              column="inside_root", value_set=[True]),
        # A file deleted, renamed or never pulled (dvc pull) after the manifest was written.
        check("file_exists", "a listed file that does not exist (deleted, moved, or not pulled with dvc pull)",
              "ExpectColumnValuesToBeInSet", column="exists", value_set=[True]),
        # Truncated downloads, zero-byte files, HTML error pages saved as .jpg, corrupt data.
        check("decodes", "a truncated, zero-byte, non-image or corrupt file the training loader cannot decode",
              "ExpectColumnValuesToBeNull", column="decode_error"),
        # The manifest's hash, sizes and splits describe content that is no longer there.
        check("file_unchanged", "a file whose content changed after `cass data prepare` (rerun it)",
              "ExpectColumnValuesToBeInSet", column="sha256_matches", value_set=[True]),
        # Thumbnails, icons or unresized whole-slide scans mixed into the dataset.
        check("width_in_bounds", f"an image width outside [{q.min_width}, {q.max_width}] px (quality.*_width)",
              "ExpectColumnValuesToBeBetween", column="width", min_value=q.min_width, max_value=q.max_width),
        check("height_in_bounds", f"an image height outside [{q.min_height}, {q.max_height}] px (quality.*_height)",
              "ExpectColumnValuesToBeBetween", column="height", min_value=q.min_height, max_value=q.max_height),
        # CMYK, 1-bit or other pixel formats the loader would not convert faithfully.
        check("mode_allowed", _modes_catch(list(q.allowed_modes), modes),
              "ExpectColumnValuesToBeInSet", column="mode", value_set=list(q.allowed_modes)),
        # A row without a label: an unlabelled image in a supervised split.
        check("has_label", "a row with no label", "ExpectColumnValuesToBeBetween", column="num_labels", min_value=1),
        # Typos and classes missing from data.classes.
        check("labels_known", f"a label outside the class set {sorted(classes)}", "ExpectColumnValuesToBeNull",
              column="unknown_labels"),
        # The same picture filed under two classes: label noise, or a copy in two class folders.
        check("hash_label_conflict", "two rows with the same content (sha256) and different labels",
              "ExpectColumnValuesToBeNull", column="conflicting_labels"),
    ]
    if not info.multilabel:
        # Two labels on a row of a single-label dataset: the softmax target would be ambiguous.
        checks_.append(check("single_label", "two or more labels on a row of a single-label dataset",
                             "ExpectColumnValuesToBeBetween", column="num_labels", max_value=1))
    return Table("images", frame, ("path",), tuple(checks_))


def classes_table(params: Params, df: pd.DataFrame, info: DatasetInfo) -> Table:
    q = params.quality
    classes = list(params.data.classes or info.classes)
    counts = {c: 0 for c in classes}
    for ls in label_lists(df):
        for c in ls:
            if c in counts:
                counts[c] += 1
    largest = max(counts.values(), default=0)
    frame = pd.DataFrame(
        {
            "class": classes,
            "images": [counts[c] for c in classes],
            "imbalance": [largest / counts[c] if counts[c] else float("inf") for c in classes],
        }
    )
    checks_ = (
        # A class too rare to learn from or to evaluate on (it would get 0-1 test images).
        check("min_images_per_class", f"a class with fewer than {q.min_images_per_class} images",
              "ExpectColumnValuesToBeBetween", column="images", min_value=q.min_images_per_class),
        # Strong imbalance: worth knowing (class weights, metrics), not always a reason to stop.
        check("imbalance_warn", f"largest class / this class above {q.imbalance_warn_ratio:g}",
              "ExpectColumnValuesToBeBetween", column="imbalance", max_value=q.imbalance_warn_ratio),
        # Extreme imbalance: the rare class is as good as absent.
        check("imbalance_fail", f"largest class / this class above {q.imbalance_fail_ratio:g}",
              "ExpectColumnValuesToBeBetween", column="imbalance", max_value=q.imbalance_fail_ratio),
    )
    return Table("classes", frame, ("class",), checks_)


def validate_manifest(
    params: Params,
    data_dir: Path,
    report_dir: Path,
    *,
    cache_path: Path | None = None,
    raise_on_failure: bool = True,
) -> GateResult:
    """Gate before any training: check every file and label of the manifest in ``data_dir``.

    Decode results are cached by content hash in ``cache_path`` (default ``report_dir/decode-cache.json``;
    keep it outside folders a tool deletes before a run, such as DVC outputs). Prepared data made from other
    settings or data than ``params`` is refused (a DataError naming the difference), not validated.
    """
    ensure_prepared(params, Path(data_dir))
    df, info = read_manifest(Path(data_dir))
    root = Path(info.root)
    paths = df["path"].astype(str).tolist()
    inside = [inside_root(p) for p in paths]
    found = iter(
        check_files(
            root,
            [p for p, ok in zip(paths, inside, strict=True) if ok],
            params.data.max_image_pixels,
            Path(cache_path) if cache_path else Path(report_dir) / CACHE_FILE,
            params.data.workers,
        )
    )
    checks = [next(found) if ok else None for ok in inside]
    tables = [images_table(params, df, info, checks), classes_table(params, df, info)]
    if info.layout == "dicom":
        from cass.quality.dicom_suite import dicom_table

        tables.append(dicom_table(params, df, info))
    return run_gate("manifest", tables, Path(report_dir), params.quality, raise_on_failure=raise_on_failure)
