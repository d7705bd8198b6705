"""Champion and challenger on the same unseen images (cass.comparison) and the data-change report
(cass.data_change), on real prepared manifests; the end-to-end runs are in test_flows.py and test_dvc.py."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from cass.comparison import (
    SharedEvaluation,
    images_hash,
    paired_bootstrap,
    unseen_rows,
    why_not_comparable,
)
from cass.data.manifest import read_manifest
from cass.data_change import changes

CLASSES = ("adipose", "lymphocytes", "stroma", "tumor")


def _manifest(prepared_dir: Path) -> pd.DataFrame:
    df, _ = read_manifest(prepared_dir)
    return df.astype(str)


def _row(path: str, labels: str, split: str, sha: str) -> dict:
    return {"path": path, "labels": labels, "split": split, "sha256": sha, "width": "32", "height": "32",
            "mode": "RGB", "group": ""}


def test_shared_images_exclude_every_image_either_model_trained_or_validated_on(prepared_dir: Path) -> None:
    # Guards: scoring the old champion on the new test split scored it on images it was trained on (104 of 240
    # images changed split when the data grew, 27 of them from train to test).
    champion = _manifest(prepared_dir)
    seen_by_champion = champion[champion["split"].isin(["train", "val"])]
    challenger = champion.copy()
    # Reshuffle: half of the champion's training images are in the challenger's test split now, and the other
    # way round; a champion training image comes back under a new name; a new file takes an old training path.
    moved = seen_by_champion.index[::2]
    challenger.loc[moved, "split"] = "test"
    back = champion.index[champion["split"] == "test"][:3]
    challenger.loc[back, "split"] = "train"
    renamed = seen_by_champion.iloc[1]
    reused_path = seen_by_champion.iloc[3]
    extra = [_row(f"new/{c}_{i}.png", c, "test", f"{c}-{i}".ljust(64, "0")) for c in CLASSES for i in range(3)]
    extra += [_row("copies/renamed.png", renamed["labels"], "test", renamed["sha256"]),
              _row(reused_path["path"] + ".tmp", reused_path["labels"], "train", "f" * 64)]
    challenger = pd.concat([challenger, pd.DataFrame(extra)], ignore_index=True)
    challenger.loc[challenger["path"] == reused_path["path"], ["sha256", "split"]] = ["e" * 64, "test"]

    shared = unseen_rows(champion, challenger)

    seen = pd.concat([m[m["split"].isin(["train", "val"])] for m in (champion, challenger)])
    assert not set(shared["sha256"]) & set(seen["sha256"]), "an image a model trained or validated on, by content"
    assert not set(shared["path"]) & set(seen["path"]), "an image a model trained or validated on, by path"
    assert "copies/renamed.png" not in set(shared["path"])  # the champion trained on its content
    assert reused_path["path"] not in set(shared["path"])  # its path was a champion training image
    assert {f"new/{c}_{i}.png" for c in CLASSES for i in range(3)} <= set(shared["path"])  # new: unseen by both
    assert set(shared["split"]) == {"test"} and shared["sha256"].is_unique
    # Every image in the shared set is a challenger test image that no train/val row of either manifest holds.
    expected = challenger[(challenger["split"] == "test") & ~challenger["sha256"].isin(seen["sha256"])
                          & ~challenger["path"].isin(seen["path"])]
    assert sorted(shared["path"]) == sorted(expected["path"])
    assert images_hash(shared) == images_hash(shared.iloc[::-1])  # names the set, not its order


def test_decision_rule_refuses_noise_and_names_both_values() -> None:
    def shared(champion: float, challenger: float, lower: float, upper: float) -> SharedEvaluation:
        return SharedEvaluation("m", "1", "2", "macro_f1", 12, "ab" * 32, champion, challenger, lower, upper, "run")

    refusal, _ = shared(0.70, 0.75, -0.02, 0.12).verdict(0.01)  # beats the margin, but the interval reaches 0
    assert refusal is not None and "too small to separate" in refusal and "0.7500" in refusal and "0.7000" in refusal
    refusal, _ = shared(0.80, 0.805, 0.001, 0.01).verdict(0.01)  # separated, but below the margin
    assert refusal is not None and "does not beat the champion by the margin 0.01" in refusal
    refusal, why = shared(0.40, 0.90, 0.30, 0.70).verdict(0.01)
    assert refusal is None and "0.9000 vs champion v1 0.4000" in why and "12 shared unseen images" in why
    record = shared(0.40, 0.90, 0.30, 0.70).record()
    assert record["champion"] == 0.40 and record["candidate"] == 0.90
    assert record["shared_evaluation_run_id"] == "run" and record["shared_images_hash"] == "ab" * 32


def test_paired_bootstrap_separates_a_real_gap_and_not_a_tie() -> None:
    rng = np.random.default_rng(0)
    y = rng.integers(0, 4, 60)
    good = np.eye(4)[y] * 0.9 + 0.025
    guess = np.full((60, 4), 0.25)
    guess[:, 0] = 0.26  # always class 0
    lo, hi = paired_bootstrap(y, guess, good, CLASSES, False, "macro_f1", 0.5, seed=1, resamples=300)
    assert 0.5 < lo <= hi
    lo, hi = paired_bootstrap(y, good, good, CLASSES, False, "macro_f1", 0.5, seed=1, resamples=300)
    assert lo == hi == 0.0


def test_other_classes_or_label_kind_are_refused_saying_which() -> None:
    single = {"per_class": {c: {} for c in CLASSES}, "macro_f1": 0.5}
    multi = {**single, "exact_match": 0.4}
    fewer = {"per_class": {c: {} for c in CLASSES[:3]}, "macro_f1": 0.5}
    assert "v2 is multi-label, champion v1 is single-label" in why_not_comparable("m", "1", "2", single, multi)
    assert "predicts classes ['adipose', 'lymphocytes', 'stroma']" in why_not_comparable("m", "1", "2", single, fewer)
    assert why_not_comparable("m", "1", "2", single, dict(single)) is None


def test_data_change_counts_added_removed_relabelled_and_moved(prepared_dir: Path) -> None:
    before = _manifest(prepared_dir)
    after = before.copy()
    after = after.drop(index=after.index[:2])  # removed
    first_test = after.index[after["split"] == "test"][0]
    old_label = after.at[first_test, "labels"]
    new_label = next(c for c in CLASSES if c != old_label)
    after.at[first_test, "labels"] = new_label  # relabelled
    mover = after.index[after["split"] == "train"][0]
    after.at[mover, "split"] = "val"  # moved
    after = pd.concat([after, pd.DataFrame([_row("new/a.png", "tumor", "test", "a" * 64)])], ignore_index=True)

    c = changes(before, after)
    assert (c["added"], c["removed"], c["relabelled"], c["moved"]) == (1, 2, 1, 1)
    assert c["moves"] == {"train -> val": 1}
    assert {"class": "tumor", "split": "test", "added": 1, "removed": 0,
            "relabelled": int(new_label == "tumor" or old_label == "tumor")} in c["per_class_split"]
    assert c["relabelled_examples"][0]["from"] == old_label and c["relabelled_examples"][0]["to"] == new_label
    assert sum(c["balance_after"].values()) == len(after) and sum(c["balance_before"].values()) == len(before)


@pytest.mark.parametrize("metric", ["macro_f1", "balanced_accuracy"])
def test_bootstrap_interval_holds_the_observed_difference(metric: str) -> None:
    from cass.comparison import metric_value

    rng = np.random.default_rng(3)
    y = rng.integers(0, 4, 40)
    a = rng.random((40, 4))
    b = np.eye(4)[y] * 0.5 + rng.random((40, 4))
    diff = metric_value(y, b, CLASSES, False, metric, 0.5) - metric_value(y, a, CLASSES, False, metric, 0.5)
    lo, hi = paired_bootstrap(y, a, b, CLASSES, False, metric, 0.5, seed=2, resamples=300)
    assert lo < diff < hi
