"""Data adapters, splits, label-fraction subsets, image conversion, and bad input."""

from __future__ import annotations

import io
import shutil
import struct
import subprocess
import sys
import zlib
from pathlib import Path
from typing import ClassVar

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image
from torch.utils.data.distributed import DistributedSampler

from cass.config import params_from_mapping
from cass.data import adapters, layouts, shapes
from cass.data.dataset import EpochLoader, ImageDataset
from cass.data.demo import CLASSES, generate_demo, render
from cass.data.images import inspect_image, load_rgb, to_rgb8
from cass.data.layouts import DatasetLayout, get_layout, layout_help, layout_names
from cass.data.manifest import label_lists, read_manifest
from cass.data.prepare import prepare_data
from cass.data.problems import Problems
from cass.data.splits import assign_splits, label_fraction_subset, read_subset, unit_draw
from cass.data.transforms import cass_transform
from cass.errors import ConfigError, DataError
from cass.training import epoch_seed, resolve_num_workers
from tests.conftest import tiny_mapping


def _png(path: Path, color: tuple[int, int, int] = (200, 100, 50), size: int = 16, mode: str = "RGB") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, (size, size), color if mode == "RGB" else color[0]).save(path)


def _prepare(root: Path, out: Path, **data):
    raw = tiny_mapping(root)
    raw["data"].update(data)
    return prepare_data(params_from_mapping(raw), out)


# --------------------------------------------------------------------------------------------------
# Demo dataset


def test_demo_is_deterministic_and_classes_differ(tmp_path: Path) -> None:
    a = np.asarray(render("tumor", 3, 32))
    assert np.array_equal(a, np.asarray(render("tumor", 3, 32)))
    assert not np.array_equal(a, np.asarray(render("tumor", 4, 32)))
    root = generate_demo(tmp_path / "demo", images_per_class=3, size=32)
    assert sorted(p.name for p in root.iterdir() if p.is_dir()) == list(CLASSES)
    assert len(list(root.rglob("*.png"))) == 12
    before = {p: p.read_bytes() for p in root.rglob("*.png")}
    generate_demo(root, images_per_class=3, size=32, force=True)
    assert before == {p: p.read_bytes() for p in root.rglob("*.png")}  # byte-identical: same DVC md5


def test_shapes_dataset_is_deterministic_grayscale_and_classes_differ_by_shape_not_brightness(tmp_path: Path) -> None:
    a = np.asarray(shapes.render("ring", 3, 32))
    assert a.ndim == 2 and shapes.render("ring", 3, 32).mode == "L"  # grayscale, as radiology files are
    assert np.array_equal(a, np.asarray(shapes.render("ring", 3, 32)))
    assert not np.array_equal(a, np.asarray(shapes.render("ring", 4, 32)))
    means = {c: np.mean([np.asarray(shapes.render(c, i, 32)).mean() for i in range(40)]) for c in shapes.CLASSES}
    assert max(means.values()) - min(means.values()) < 8, means  # brightness does not give the class away
    root = generate_demo(tmp_path / "shapes", images_per_class=3, size=32, kind="shapes")
    assert sorted(p.name for p in root.iterdir() if p.is_dir()) == list(shapes.CLASSES)
    before = {p: p.read_bytes() for p in root.rglob("*.png")}
    generate_demo(root, images_per_class=3, size=32, kind="shapes", force=True)
    assert before == {p: p.read_bytes() for p in root.rglob("*.png")}
    # Switching kind in the same folder leaves one dataset, not a mix of both.
    generate_demo(root, images_per_class=3, size=32, kind="tissue")
    assert sorted(p.name for p in root.iterdir() if p.is_dir()) == list(CLASSES)
    with pytest.raises(ValueError, match="data.demo_kind: unknown generated dataset 'xray'"):
        generate_demo(root, images_per_class=3, size=32, kind="xray")


def test_shapes_dataset_prepares_like_any_imagefolder(tmp_path: Path) -> None:
    root = generate_demo(tmp_path / "shapes", images_per_class=10, size=32, kind="shapes")
    out = _prepare(root, tmp_path / "prepared", demo_kind="shapes")
    df, info = read_manifest(out)
    assert info.classes == shapes.CLASSES and set(df["mode"]) == {"L"}
    assert load_rgb(root / df["path"].iloc[0]).mode == "RGB"  # converted for the networks like any grayscale file


# --------------------------------------------------------------------------------------------------
# Adapters


def test_imagefolder_honours_predefined_training_testing_split(tmp_path: Path) -> None:
    root = tmp_path / "mri"
    for s, (split, n) in enumerate((("Training", 10), ("Testing", 4))):
        for c, cls in enumerate(("glioma", "meningioma", "notumor")):
            for i in range(n):  # every image distinct: a copy in Training and Testing is an error of its own
                _png(root / split / cls / f"{i}.jpg", (i * 20, c * 60, s * 100))
    (root / "Training" / "glioma" / "README.txt").write_text("not an image, skipped")
    out = _prepare(root, tmp_path / "out")
    df, info = read_manifest(out)
    assert info.classes == ("glioma", "meningioma", "notumor")
    assert set(df[df["path"].str.startswith("Testing/")]["split"]) == {"test"}
    train_side = df[df["path"].str.startswith("Training/")]
    assert set(train_side["split"]) == {"train", "val"}  # val carved out of Training/ only
    assert (train_side["split"] == "val").sum() >= 3  # every class gets a validation example
    assert not df["path"].str.endswith(".txt").any()


def test_csv_onehot_single_label_isic_format(tmp_path: Path) -> None:
    root = tmp_path / "isic"
    cols = ["MEL", "NV", "BCC", "AK", "BKL", "DF", "VASC", "SCC", "UNK"]
    rows = []
    for i in range(24):
        onehot = [0.0] * 9
        onehot[i % 3] = 1.0  # MEL, NV, BCC used; the rest never
        rows.append([f"ISIC_{i:07d}", *onehot])
        _png(root / "ISIC_2019_Training_Input" / f"ISIC_{i:07d}.jpg", (i * 10, 0, 0))
    pd.DataFrame(rows, columns=["image", *cols]).to_csv(root / "gt.csv", index=False)
    csv = {"file": "gt.csv", "image_dir": "ISIC_2019_Training_Input", "extension": ".jpg"}
    out = _prepare(root, tmp_path / "out", layout="csv", csv=csv)
    df, info = read_manifest(out)
    assert info.classes == ("MEL", "NV", "BCC") and not info.multilabel
    assert df.loc[df["path"].str.endswith("ISIC_0000004.jpg"), "labels"].item() == "NV"
    assert set(df["split"]) == {"train", "val", "test"}


def test_csv_multilabel_keeps_every_label(tmp_path: Path) -> None:
    root = tmp_path / "ml"
    rows = []
    for i in range(12):
        _png(root / f"img{i}.png", (i * 15, 5, 5))
        rows.append({"id": f"img{i}", "a": 1, "b": int(i % 2 == 0), "c": int(i % 3 == 0)})
    pd.DataFrame(rows).to_csv(root / "labels.csv", index=False)
    result = adapters.csv_onehot(root, params_from_mapping(
        {"data": {"layout": "csv", "csv": {"file": "labels.csv", "image_column": "id", "extension": ".png",
                                           "multilabel": True}}}).data.csv)
    assert result.multilabel and result.classes == ("a", "b", "c")
    assert label_lists(result.rows)[0] == ["a", "b", "c"]
    assert label_lists(result.rows)[1] == ["a"]


def test_medmnist_npz(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    arrays = {}
    for split, n in (("train", 20), ("val", 6), ("test", 6)):
        arrays[f"{split}_images"] = rng.integers(0, 255, size=(n, 28, 28), dtype=np.uint8)
        arrays[f"{split}_labels"] = (np.arange(n) % 3).reshape(n, 1)
    root = tmp_path / "mnist"
    root.mkdir()
    np.savez(root / "pathmnist.npz", **arrays)
    out = _prepare(root, tmp_path / "out", layout="medmnist", medmnist_file="pathmnist.npz",
                   classes=["adipose", "background", "debris"])
    df, info = read_manifest(out)
    assert info.classes == ("adipose", "background", "debris")
    assert df["split"].value_counts().to_dict() == {"train": 20, "val": 6, "test": 6}  # predefined splits kept
    assert (df["mode"] == "L").all() and (df["width"] == 28).all()


# --------------------------------------------------------------------------------------------------
# Splits and subsets


def _rows(n_per_class: dict[str, int], groups: bool = False) -> pd.DataFrame:
    rows = []
    for c, n in n_per_class.items():
        for i in range(n):
            rows.append({"path": f"{c}/{i}.png", "labels": c, "split": "", "group": f"p{c}{i // 3}" if groups else ""})
    return pd.DataFrame(rows)


def test_splits_are_stratified_seeded_and_complete() -> None:
    rows = _rows({"a": 100, "b": 30, "c": 10})
    s1 = assign_splits(rows, 0.1, 0.2, seed=77)
    s2 = assign_splits(rows.sample(frac=1.0, random_state=1), 0.1, 0.2, seed=77).sort_values("path")
    assert s1.sort_values("path")["split"].tolist() == s2["split"].tolist()  # order-independent, seeded
    assert s1["split"].tolist() != assign_splits(rows, 0.1, 0.2, seed=78)["split"].tolist()
    counts = pd.crosstab(s1["labels"], s1["split"])
    assert (counts > 0).all().all()  # every class in every split (the 10-image class by the tiny-class rule)
    # Shares follow the settings per class within binomial noise (3 standard deviations), not exactly.
    for cls, n in (("a", 100), ("b", 30)):
        for split, share in (("test", 0.2), ("val", 0.1)):
            assert abs(counts.loc[cls, split] / n - share) <= 3 * (share * (1 - share) / n) ** 0.5, (cls, split)


def _grown(rows: pd.DataFrame, extra: dict[str, int], groups: bool) -> pd.DataFrame:
    """``rows`` plus ``extra`` new images per class: with ``groups``, every other one joins an existing patient."""
    new = []
    for c, n in extra.items():
        for i in range(n):
            group = (f"p{c}{i}" if i % 2 else f"new{c}{i}") if groups else ""
            new.append({"path": f"{c}/new{i}.png", "labels": c, "split": "", "group": group, "sha256": f"n{c}{i}"})
    return pd.concat([rows, pd.DataFrame(new)], ignore_index=True)


@pytest.mark.parametrize("groups", [False, True])
def test_adding_images_keeps_every_existing_split_and_removing_moves_none(groups: bool) -> None:
    # Guards: with a rank-based split, going from 60 to 80 images per class moved 104 of 240 images, 27 of
    # them from train to test, so no test split of one data version was unseen by a model of the other.
    rows = _rows({"a": 60, "b": 60, "c": 60}, groups=groups)
    rows["sha256"] = [f"h{i}" for i in range(len(rows))]
    before = assign_splits(rows, 0.1, 0.2, seed=77).set_index("path")["split"]
    grown = assign_splits(_grown(rows, {"a": 20, "b": 20, "c": 20}, groups), 0.1, 0.2, seed=77)
    after = grown.set_index("path")["split"]
    assert (after[before.index] == before).all()  # every existing image kept its split
    assert (grown.groupby("group")["split"].nunique()[lambda s: s.index != ""] == 1).all()  # new images join
    new = grown[grown["path"].str.contains("new")]
    assert set(new["split"]) == {"train", "val", "test"}  # the new images are assigned, in every split
    counts = pd.crosstab(grown["labels"], grown["split"]) / 80
    assert (counts["test"] - 0.2).abs().max() < 0.15 and (counts["val"] - 0.1).abs().max() < 0.12, counts

    # Removing images (a third of them, here) moves none of the others.
    kept = grown.iloc[[i for i in range(len(grown)) if i % 3]].assign(split="")
    shrunk = assign_splits(kept, 0.1, 0.2, seed=77).set_index("path")["split"]
    assert (shrunk == after[shrunk.index]).all()


def test_a_renamed_or_relabelled_copy_keeps_its_split_by_content() -> None:
    rows = _rows({"a": 40, "b": 40}).assign(sha256=[f"h{i}" for i in range(80)])
    before = assign_splits(rows, 0.1, 0.2, seed=77)
    moved = rows.copy()
    moved.loc[0, ["path", "labels"]] = ["b/was-a0.png", "b"]  # ImageFolder relabel: the file moves folders
    after = assign_splits(moved, 0.1, 0.2, seed=77)
    assert after.loc[0, "split"] == before.loc[0, "split"]
    assert (after["split"] == before["split"]).all()


def test_group_never_spans_two_splits() -> None:
    rows = _rows({"a": 60, "b": 60}, groups=True)
    split = assign_splits(rows, 0.15, 0.25, seed=3)
    per_group = split.groupby("group")["split"].nunique()
    assert (per_group == 1).all()
    assert set(split["split"]) == {"train", "val", "test"}


def test_label_fraction_subsets_are_stratified_nested_and_cover_classes() -> None:
    train = _rows({"a": 300, "b": 60, "c": 7}).assign(split="train")
    one = label_fraction_subset(train, 0.01, seed=5)
    ten = label_fraction_subset(train, 0.1, seed=5)
    assert set(one["labels"]) == set(ten["labels"]) == {"a", "b", "c"}  # at least one per class
    sizes = ten["labels"].value_counts()
    assert abs(sizes["a"] - 30) <= 3 * (300 * 0.1 * 0.9) ** 0.5 and 1 <= sizes["c"] <= 4  # about 10 % per class
    assert set(one["path"]) <= set(ten["path"])  # nested: 1 % lies inside 10 %
    assert label_fraction_subset(train, 0.1, seed=5)["path"].tolist() == ten["path"].tolist()
    assert len(label_fraction_subset(train, 1.0, seed=5)) == len(train)


def test_label_fraction_subsets_stay_nested_across_data_versions() -> None:
    # Guards: subsets drawn by a seeded permutation of the whole train split changed completely when images
    # were added, so a label-efficiency run on the new data did not see the images labelled before.
    rows = _rows({"a": 120, "b": 60, "c": 30}).assign(sha256=lambda d: [f"h{i}" for i in range(len(d))])
    v1 = assign_splits(rows, 0.1, 0.2, seed=7)
    v2 = assign_splits(_grown(rows, {"a": 40, "b": 20, "c": 10}, False), 0.1, 0.2, seed=7)
    for fraction in (0.01, 0.1, 0.25, 0.5):
        old = label_fraction_subset(v1[v1["split"] == "train"], fraction, seed=7)
        new = label_fraction_subset(v2[v2["split"] == "train"], fraction, seed=7)
        lost = set(old["path"]) - set(new["path"])
        # Only the fallback pick of a class (its smallest draw, above the fraction) may give way to a new image.
        for path in lost:
            h = old.loc[old["path"] == path, "sha256"].iloc[0]
            assert unit_draw(f"sha256:{h}", 7, "subset") >= fraction, (fraction, path)
            assert new["path"].str.contains("new").any()
        if fraction >= 0.1:
            assert not lost, fraction  # classes large enough: nested outright
        assert set(new["labels"]) == {"a", "b", "c"}


def test_prepare_writes_subsets_inside_train(prepared_dir: Path) -> None:
    df, _ = read_manifest(prepared_dir)
    train = set(df.loc[df["split"] == "train", "path"])
    quarter = read_subset(prepared_dir, 0.25)
    assert set(quarter) <= train and 0 < len(quarter) < len(train)
    with pytest.raises(DataError, match="no subset for label fraction 0.5"):
        read_subset(prepared_dir, 0.5)
    assert len(df) == 64 and df["sha256"].str.len().eq(64).all()


def test_prepare_on_grown_data_keeps_the_splits_and_a_new_seed_reshuffles_saying_so(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    root, out = tmp_path / "demo", tmp_path / "prepared"
    generate_demo(root, images_per_class=16, size=32)
    before, _ = read_manifest(_prepare(root, out))
    generate_demo(root, images_per_class=24, size=32)  # the same 16 images per class (byte-identical), 8 new
    with caplog.at_level("INFO", logger="cass.data.prepare"):
        after, info = read_manifest(_prepare(root, out))
    assert after.set_index("path").loc[before["path"], "split"].tolist() == before["split"].tolist()
    assert info.split_changes == {"rule": "hash-bands-1", "compared_with": info.split_changes["compared_with"],
                                  "reshuffled": False, "changed_settings": {}, "kept": 64, "moved": 0,
                                  "added": 32, "removed": 0}
    assert "splits kept: all 64 earlier images kept their split; 32 new images assigned" in caplog.text
    fresh, _ = read_manifest(_prepare(root, tmp_path / "fresh-worker"))  # no earlier outputs: the same splits
    assert fresh["split"].tolist() == after["split"].tolist()

    caplog.clear()
    raw = tiny_mapping(root)
    raw["split"]["seed"] = 8
    with caplog.at_level("INFO", logger="cass.data.prepare"):
        reshuffled, info = read_manifest(prepare_data(params_from_mapping(raw), out))
    assert info.split_changes["reshuffled"] and info.split_changes["changed_settings"] == {"split.seed": [7, 8]}
    assert info.split_changes["moved"] == (reshuffled["split"] != after["split"]).sum() > 0
    assert "split settings changed since the last prepare (split.seed: 7 -> 8): splits drawn again" in caplog.text


# --------------------------------------------------------------------------------------------------
# Image conversion


def test_modes_are_converted_to_8bit_rgb(tmp_path: Path) -> None:
    sixteen = Image.fromarray(np.array([[0, 1000], [2000, 4095]], dtype=np.uint16))
    rgb = to_rgb8(sixteen)
    assert rgb.mode == "RGB" and np.asarray(rgb)[1, 1].tolist() == [255, 255, 255]
    assert np.asarray(rgb)[0, 0].tolist() == [0, 0, 0]  # windowed to the image's own range
    rgba = Image.new("RGBA", (2, 2), (255, 0, 0, 0))
    assert np.asarray(to_rgb8(rgba))[0, 0].tolist() == [0, 0, 0]  # transparent -> black
    gray = Image.new("L", (2, 2), 77)
    assert np.asarray(to_rgb8(gray))[0, 0].tolist() == [77, 77, 77]
    sixteen.save(tmp_path / "x.png")
    assert load_rgb(tmp_path / "x.png").mode == "RGB"


# --------------------------------------------------------------------------------------------------
# Bad input: a clear error naming the file or row, nothing half-written


def _dataset(tmp_path: Path) -> Path:
    root = tmp_path / "ds"
    for c in ("a", "b"):
        for i in range(6):
            _png(root / c / f"{i}.png", (i * 30, 40, 90))
    return root


@pytest.mark.parametrize(
    ("plant", "message"),
    [
        (lambda p: p.write_bytes(b""), r"empty \(0 bytes\)"),
        (lambda p: p.write_text("hello, I am text"), "not an image"),
        (lambda p: p.write_bytes(p.read_bytes()[:60]), "truncated or corrupt"),
    ],
    ids=["zero-byte", "not-an-image", "truncated"],
)
def test_bad_image_files_are_named(tmp_path: Path, plant, message: str) -> None:
    root = _dataset(tmp_path)
    bad = root / "b" / "3.png"
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(buf, "PNG")
    bad.write_bytes(buf.getvalue())
    plant(bad)
    out = tmp_path / "out"
    with pytest.raises(DataError, match=message) as err:
        _prepare(root, out)
    assert "b/3.png" in str(err.value)
    assert not out.exists()  # nothing half-written


def test_failed_prepare_keeps_previous_outputs(tmp_path: Path) -> None:
    root = _dataset(tmp_path)
    out = _prepare(root, tmp_path / "out")
    before = (out / "manifest.csv").read_bytes()
    (root / "a" / "0.png").write_bytes(b"")
    with pytest.raises(DataError):
        _prepare(root, out)
    assert (out / "manifest.csv").read_bytes() == before


def test_decompression_bomb_is_refused(tmp_path: Path) -> None:
    big = tmp_path / "big.png"
    Image.new("L", (3000, 3000)).save(big)
    with pytest.raises(DataError, match="decompression bomb"):
        inspect_image(big, max_pixels=1_000_000)
    assert inspect_image(big, max_pixels=10_000_000).width == 3000


def test_empty_class_folder_is_named(tmp_path: Path) -> None:
    root = _dataset(tmp_path)
    (root / "c").mkdir()
    with pytest.raises(DataError, match=r"/c: empty class folder"):
        adapters.imagefolder(root)


def test_missing_file_unknown_label_and_bad_rows_in_csv(tmp_path: Path) -> None:
    root = tmp_path / "isic"
    for i in range(4):
        _png(root / "img" / f"x{i}.jpg")
    pd.DataFrame({"image": ["x0", "x1", "x2", "x3", "x9"], "MEL": [1, 0, 0, 1, 1], "NV": [0, 1, 0, 1, 0]}).to_csv(
        root / "gt.csv", index=False)
    layout = params_from_mapping({"data": {"layout": "csv", "csv": {"file": "gt.csv", "image_dir": "img"}}}).data.csv
    with pytest.raises(DataError) as err:
        adapters.csv_onehot(root, layout)
    text = str(err.value)
    assert "row 4 (x2): no label" in text
    assert "row 5 (x3): 2 labels ['MEL', 'NV'] in a single-label dataset" in text

    pd.DataFrame({"image": ["x0", "x1", "x9"], "MEL": [1, 0, 1], "NV": [0, 1, 0]}).to_csv(root / "gt.csv", index=False)
    with pytest.raises(DataError, match=r"img/x9.jpg: file not found"):
        _prepare(root, tmp_path / "out", layout="csv", csv={"file": "gt.csv", "image_dir": "img"})
    pd.DataFrame({"image": ["x0", "x1"], "MEL": [1, 0], "NV": [0, 1]}).to_csv(root / "gt.csv", index=False)
    with pytest.raises(DataError, match=r"(?s)outside data.classes.*label 'NV'"):
        _prepare(root, tmp_path / "out", layout="csv", csv={"file": "gt.csv", "image_dir": "img"},
                 classes=["MEL", "BCC"])


def test_csv_path_escaping_the_root_is_refused(tmp_path: Path) -> None:
    root = tmp_path / "isic"
    root.mkdir()
    _png(tmp_path / "secret.jpg")
    pd.DataFrame({"image": ["../secret", "ok"], "MEL": [1, 0], "NV": [0, 1]}).to_csv(root / "gt.csv", index=False)
    layout = params_from_mapping({"data": {"layout": "csv", "csv": {"file": "gt.csv"}}}).data.csv
    with pytest.raises(DataError, match=r"row 2: path '\./\.\./secret.jpg' escapes the data root|row 2: path.*escapes"):
        adapters.csv_onehot(root, layout)


def _epoch_batches(loaders, epoch: int) -> list[torch.Tensor]:
    return [x for x, _ in loaders.for_epoch(epoch_seed(5, epoch), epoch, rank=0)]


def test_persistent_loader_workers_follow_each_epochs_seed(prepared_dir: Path, tiny_params) -> None:
    # Workers started once keep their copy of the dataset, so each epoch's seed must reach them with the
    # indices: with 2 workers every epoch must match the in-process loader image for image.
    df, info = read_manifest(prepared_dir)
    strong = tiny_params.augment.model_copy(update={"affine_p": 1.0, "color_jitter_p": 1.0, "perspective_p": 1.0})
    ds = ImageDataset(Path(info.root), df["path"].tolist()[:12], cass_transform(32, strong))
    runs = {}
    for workers in (0, 2):
        sampler = DistributedSampler(ds, num_replicas=1, rank=0, shuffle=False)  # fixed order: views only
        loaders = EpochLoader(ds, sampler, batch_size=4, num_workers=workers, drop_last=False)
        runs[workers] = [_epoch_batches(loaders, epoch) for epoch in range(3)]
        if workers:
            assert loaders.loader._iterator is not None and loaders.loader.persistent_workers
    for epoch in range(3):
        for a, b in zip(runs[0][epoch], runs[2][epoch], strict=True):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
    first, second = torch.cat(runs[0][0]), torch.cat(runs[0][1])
    assert not torch.equal(first, second)  # the next epoch: other views of the same images


def test_num_workers_auto_loads_in_process_on_cpu_and_spreads_spare_cores_otherwise(monkeypatch) -> None:
    cpu, gpu = torch.device("cpu"), torch.device("cuda")
    assert resolve_num_workers(3, cpu) == 3
    assert resolve_num_workers("auto", cpu) == 0
    monkeypatch.setattr("os.sched_getaffinity", lambda _pid: set(range(16)), raising=False)
    assert resolve_num_workers("auto", gpu) == 8
    assert resolve_num_workers("auto", gpu, processes=4) == 3
    monkeypatch.setattr("os.sched_getaffinity", lambda _pid: {0, 1}, raising=False)
    assert resolve_num_workers("auto", gpu) == 1
    assert resolve_num_workers("auto", gpu, processes=2) == 0


@pytest.mark.parametrize("value", [-1, "many", 1.5])
def test_num_workers_must_be_a_count_or_auto(value) -> None:
    with pytest.raises(ConfigError, match="num_workers"):
        params_from_mapping({"pretrain": {"num_workers": value}})


# --------------------------------------------------------------------------------------------------
# The registry of dataset layouts


def test_unknown_layout_names_the_key_the_known_layouts_and_the_closest(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as err:
        params_from_mapping({"data": {"layout": "cvs"}})
    text = str(err.value)
    assert "data.layout" in text and "did you mean 'csv'" in text
    assert all(name in text for name in layout_names()) and {"imagefolder", "csv", "medmnist"} <= set(layout_names())
    with pytest.raises(ConfigError, match=r"data.layout is 'medmnist' but data.medmnist_file is not set"):
        params_from_mapping({"data": {"layout": "medmnist"}})
    with pytest.raises(ConfigError, match=r"data.layout is 'csv' but data.csv is not set"):
        params_from_mapping({"data": {"layout": "csv"}})


class _LabelsTxt(DatasetLayout):
    """A layout invented for the test: ``labels.txt`` lines ``<file> <class>``."""

    name = "labelstxt"
    help = "<root>/labels.txt: one '<file> <class>' per line"
    settings: ClassVar[dict[str, str]] = {"classes": "the class list"}

    def list_files(self, data, problems):
        root = Path(data.root)
        rows = []
        for n, line in enumerate((root / "labels.txt").read_text().splitlines(), start=1):
            file, label = line.split()
            if not (root / file).is_file():
                problems.add("file not found", f"labels.txt line {n}: {file}: file not found")
                continue
            rows.append({"path": file, "labels": label, "split": "", "group": ""})
        return adapters.AdapterResult(pd.DataFrame(rows), tuple(data.classes), False, root)


@pytest.fixture
def registry(monkeypatch: pytest.MonkeyPatch):
    """The layout registry, restored after the test."""
    monkeypatch.setattr(layouts, "_LAYOUTS", dict(layouts._LAYOUTS))
    return layouts


def test_a_new_layout_is_one_adapter_and_one_registration(tmp_path: Path, registry) -> None:
    registry.register_layout(_LabelsTxt)
    assert "labelstxt" in layout_names() and "labelstxt: <root>/labels.txt" in layout_help()
    root = tmp_path / "txt"
    lines = []
    for c in ("a", "b"):
        for i in range(6):
            _png(root / f"{c}{i}.png", (i * 30, 40 if c == "a" else 200, 90))
            lines.append(f"{c}{i}.png {c}")
    (root / "labels.txt").write_text("\n".join(lines) + "\n")
    with pytest.raises(ConfigError, match="data.classes is not set"):  # its required settings are checked
        params_from_mapping({"data": {"layout": "labelstxt", "root": str(root)}})
    df, info = read_manifest(_prepare(root, tmp_path / "out", layout="labelstxt", classes=["a", "b"]))
    assert info.layout == "labelstxt" and info.classes == ("a", "b") and len(df) == 12

    (root / "labels.txt").write_text("\n".join([*lines, "gone.png a"]) + "\n")
    with pytest.raises(DataError, match=r"labels.txt line 13: gone.png: file not found"):
        _prepare(root, tmp_path / "out", layout="labelstxt", classes=["a", "b"])


def test_importing_the_settings_does_not_import_the_data_stack() -> None:
    """params.yaml is validated by every command, also those that never read an image."""
    code = ("import sys, cass.config; heavy = [m for m in ('pandas', 'numpy', 'PIL', 'torch') if m in sys.modules]; "
            "sys.exit(str(heavy) if heavy else 0)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stderr


def test_medmnist_listing_counts_images_without_extracting_them(tmp_path: Path) -> None:
    root = tmp_path / "mnist"
    root.mkdir()
    arrays = {}
    for split, n in (("train", 8), ("val", 2), ("test", 3)):
        arrays[f"{split}_images"] = np.zeros((n, 28, 28), dtype=np.uint8)
        arrays[f"{split}_labels"] = (np.arange(n) % 2).reshape(n, 1)
    np.savez(root / "x.npz", **arrays)
    data = params_from_mapping({"data": {"root": str(root), "layout": "medmnist", "medmnist_file": "x.npz"}}).data
    result = get_layout("medmnist").list_files(data, Problems())
    assert len(result.rows) == 13 and result.classes == ("0", "1")
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["mnist", "x.npz"]  # nothing written


# --------------------------------------------------------------------------------------------------
# A dataset's faults, all in one report (issue 18)


def _onehot_csv(root: Path, rows: list[list], columns: tuple[str, ...] = ("image", "MEL", "NV")) -> None:
    root.mkdir(parents=True, exist_ok=True)
    with open(root / "gt.csv", "w") as fh:
        fh.write(",".join(columns) + "\n")
        fh.writelines(",".join(str(v) for v in row) + "\n" for row in rows)


def _csv_images(root: Path, n: int, ext: str = ".jpg") -> list[str]:
    ids = [f"x{i}" for i in range(n)]
    for i, image_id in enumerate(ids):
        _png(root / "img" / f"{image_id}{ext}", (i * 7 % 256, 40, 90))
    return ids


CSV = {"file": "gt.csv", "image_dir": "img"}


def test_every_kind_of_fault_is_reported_in_one_pass_with_rows_and_files(tmp_path: Path) -> None:
    root = tmp_path / "isic"
    ids = _csv_images(root, 30)
    rows = [[image_id, i % 2, 1 - i % 2] for i, image_id in enumerate(ids)]
    rows[3][1] = "yes"  # row 5: a bad value
    rows += [[f"gone{i}", 1, 0] for i in range(25)]  # rows 32-56: missing files
    _onehot_csv(root, rows)
    (root / "img" / "x7.jpg").write_bytes(b"")  # row 9: an empty file
    (root / "img" / "x8.jpg").write_bytes((root / "img" / "x9.jpg").read_bytes()[:50])  # row 10: truncated
    out = tmp_path / "out"
    with pytest.raises(DataError) as err:
        _prepare(root, out, layout="csv", csv=CSV)
    text = str(err.value)
    assert "label value not 0 or 1 (1)" in text and "row 5 (x3): MEL = 'yes'" in text
    assert "file not found (25)" in text and "row 32 (gone0): img/gone0.jpg: file not found" in text
    assert "... and 5 more" in text  # bounded: the first 20 of a kind
    assert "empty file (1)" in text and "img/x7.jpg: the file is empty" in text
    assert "truncated or corrupt image (1)" in text and "img/x8.jpg" in text
    assert not out.exists()


def test_a_row_without_any_label_cell_is_one_line_not_one_per_column(tmp_path: Path) -> None:
    root = tmp_path / "isic"
    cols = ("image", "MEL", "NV", "BCC", "AK", "BKL", "DF", "VASC", "SCC")
    ids = _csv_images(root, 6)
    rows = [[image_id, *([1, 0] if i % 2 else [0, 1]), 0, 0, 0, 0, 0, 0] for i, image_id in enumerate(ids)]
    rows[4] = [ids[4], *[""] * 8]
    _onehot_csv(root, rows, cols)
    with pytest.raises(DataError) as err:
        _prepare(root, tmp_path / "out", layout="csv", csv=CSV)
    text = str(err.value)
    assert "row 6 (x4): no label (every label cell is empty)" in text
    assert "is not 0 or 1" not in text and "1 problem(s) of 1 kind(s)" in text


def test_duplicate_ids_in_the_csv_are_named_with_their_rows(tmp_path: Path) -> None:
    root = tmp_path / "isic"
    ids = _csv_images(root, 8)
    rows = [[image_id, i % 2, 1 - i % 2] for i, image_id in enumerate(ids)]
    _onehot_csv(root, [*rows, [ids[1], 1, 0]])  # row 10 repeats row 3, same labels
    with pytest.raises(DataError) as err:
        _prepare(root, tmp_path / "out", layout="csv", csv=CSV)
    assert "duplicate image id (1): keep one row per image" in str(err.value)
    assert "rows 3, 10: image id 'x1' appears 2 times (the same labels)" in str(err.value)
    _onehot_csv(root, [*rows, [ids[1], 0, 1]])  # ... conflicting labels
    with pytest.raises(DataError, match=r"rows 3, 10: image id 'x1' appears 2 times \(conflicting labels MEL / NV\)"):
        _prepare(root, tmp_path / "out", layout="csv", csv=CSV)


def test_same_image_in_training_and_testing_stops_prepare_and_keeps_the_outputs(tmp_path: Path) -> None:
    root = tmp_path / "mri"
    for s, split in enumerate(("Training", "Testing")):
        for c, cls in enumerate(("glioma", "notumor")):
            for i in range(6):
                _png(root / split / cls / f"{i}.png", (i * 20, c * 60, s * 100))
    out = _prepare(root, tmp_path / "out")
    before = (out / "manifest.csv").read_bytes()
    shutil.copy(root / "Training" / "glioma" / "2.png", root / "Testing" / "glioma" / "copy.png")
    with pytest.raises(DataError) as err:
        _prepare(root, out)
    assert "same image in two predefined splits (1)" in str(err.value)
    assert "test: Testing/glioma/copy.png; train: Training/glioma/2.png" in str(err.value)
    assert (out / "manifest.csv").read_bytes() == before


def test_copies_of_one_image_land_in_one_split() -> None:
    rows = _rows({"a": 60, "b": 60})
    rows["sha256"] = [f"h{i // 2}" for i in range(len(rows))]  # every image twice, under two names
    split = assign_splits(rows, 0.1, 0.2, seed=77)
    assert (split.groupby("sha256")["split"].nunique() == 1).all()
    single = assign_splits(rows.iloc[::2], 0.1, 0.2, seed=77)  # one copy of each: the same splits
    assert single["split"].tolist() == split.iloc[::2]["split"].tolist()


# --------------------------------------------------------------------------------------------------
# Settings the data implies (issue 18)


def test_ids_that_already_end_in_an_extension_need_no_setting(tmp_path: Path) -> None:
    root = tmp_path / "isic"
    ids = _csv_images(root, 8, ext=".png")
    _onehot_csv(root, [[f"{image_id}.png", i % 2, 1 - i % 2] for i, image_id in enumerate(ids)])
    df, _ = read_manifest(_prepare(root, tmp_path / "out", layout="csv", csv=CSV))
    assert sorted(df["path"]) == sorted(f"img/{i}.png" for i in ids)


@pytest.mark.parametrize(
    ("stored", "setting", "ids_with_ext"),
    [(".png", "set data.csv.extension: .png", False), (".png", "set data.csv.extension: ''", True)],
    ids=["other extension", "ids carry the extension"],
)
def test_missing_files_name_the_setting_that_finds_them(tmp_path: Path, stored: str, setting: str,
                                                        ids_with_ext: bool) -> None:
    root = tmp_path / "isic"
    ids = _csv_images(root, 8, ext=stored)
    _onehot_csv(root, [[f"{x}{stored}" if ids_with_ext else x, i % 2, 1 - i % 2] for i, x in enumerate(ids)])
    with pytest.raises(DataError) as err:
        _prepare(root, tmp_path / "out", layout="csv", csv={**CSV, "extension": ".jpg"})
    assert "file not found (8)" in str(err.value) and setting in str(err.value)


def test_image_dir_is_suggested_when_the_files_are_elsewhere(tmp_path: Path) -> None:
    root = tmp_path / "isic"
    ids = _csv_images(root, 6)
    _onehot_csv(root, [[x, i % 2, 1 - i % 2] for i, x in enumerate(ids)])
    with pytest.raises(DataError, match="set data.csv.image_dir: img"):
        _prepare(root, tmp_path / "out", layout="csv", csv={"file": "gt.csv"})


def test_label_column_names_are_stripped_with_a_warning(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    root = tmp_path / "isic"
    ids = _csv_images(root, 8)
    _onehot_csv(root, [[x, i % 2, 1 - i % 2] for i, x in enumerate(ids)], ("image", "MEL ", " NV"))
    with caplog.at_level("WARNING"):
        _, info = read_manifest(_prepare(root, tmp_path / "out", layout="csv", csv=CSV))
    assert info.classes == ("MEL", "NV")
    assert "stripped the spaces around column names ['MEL ', ' NV']" in caplog.text


def test_multilabel_medmnist_against_an_accuracy_setting_stops_prepare_naming_the_fix(tmp_path: Path) -> None:
    root = tmp_path / "chest"
    root.mkdir()
    rng = np.random.default_rng(1)
    arrays = {}
    for split, n in (("train", 12), ("val", 4), ("test", 4)):
        arrays[f"{split}_images"] = rng.integers(0, 255, size=(n, 28, 28), dtype=np.uint8)
        arrays[f"{split}_labels"] = np.stack([np.ones(n), np.arange(n) % 2, np.arange(n) % 3 == 0], 1).astype(int)
    np.savez(root / "chestmnist.npz", **arrays)
    raw = tiny_mapping(root)
    raw["data"].update(layout="medmnist", medmnist_file="chestmnist.npz")
    raw["quality"] = {"expected_metrics": ["macro_f1", "accuracy"]}
    params = params_from_mapping(raw)  # the settings alone cannot tell that ChestMNIST is multi-label
    out = tmp_path / "out"
    with pytest.raises(DataError) as err:
        prepare_data(params, out)
    assert "setting the data contradicts (1)" in str(err.value) and not (out / "manifest.csv").exists()
    assert "quality.expected_metrics lists ['accuracy']" in str(err.value)
    assert "set quality.expected_metrics: auto" in str(err.value)
    raw["quality"] = {}
    _, info = read_manifest(prepare_data(params_from_mapping(raw), out))
    assert info.multilabel


def test_decompression_bomb_message_names_the_setting_not_pillows_limit(tmp_path: Path) -> None:
    def header_only_png(width: int, height: int) -> bytes:
        def chunk(kind: bytes, data: bytes) -> bytes:
            return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

        ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
        return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 10))

    huge = tmp_path / "huge.png"
    huge.write_bytes(header_only_png(20_000, 10_000))  # 200 M pixels: above Pillow's own hard limit
    with pytest.raises(DataError) as err:
        inspect_image(huge, max_pixels=1_000_000)
    assert "200,000,000 pixels exceeds data.max_image_pixels (1,000,000)" in str(err.value)
    assert "178956970" not in str(err.value) and "89478485" not in str(err.value)
    big = tmp_path / "big.png"
    big.write_bytes(header_only_png(10_000, 10_000))  # 100 M pixels: above Pillow's warning threshold only
    with pytest.raises(DataError) as err:
        inspect_image(big, max_pixels=150_000_000)  # the setting allows it: not refused as a bomb
    assert "decompression bomb" not in str(err.value) and "truncated or corrupt" in str(err.value)
