"""Faults while a stage writes its outputs: SIGKILL at chosen moments, a full disk, leftovers of killed writes.

The stages run as real `cass` processes; a kill comes from a real SIGKILL, sent by the process itself at
the named moment (a wrapper around ``os.replace``/``torch.save`` installed before the CLI starts), so the
moment is exact instead of a race. The full disk is a real size-limited filesystem (tmpfs).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pandas as pd
import pytest
import yaml

from cass import io as cass_io
from cass.config import params_from_mapping
from cass.errors import DiskFullError
from cass.outputs import FinetuneOutputs
from tests.conftest import service_unavailable, tiny_mapping

ROOT = Path(__file__).resolve().parents[1]
SET_FILES = ("model.safetensors", "model.json", "history.csv", "lineage.json", "metrics.json")

# Runs the CLI after installing a kill switch: SIGKILL right after the KILL_AFTER-th replacement of one of
# the output set's files (1 = just after model.safetensors is replaced), or right after torch.save wrote a
# checkpoint's temporary file (KILL_IN_CHECKPOINT=1), before it is renamed.
_RUNNER = textwrap.dedent("""
    import os, signal, sys
    after = int(os.environ.get("KILL_AFTER", "0"))
    names = set(os.environ.get("KILL_NAMES", "").split(","))
    real_replace, seen = os.replace, [0]
    def replace(src, dst, *a, **k):
        real_replace(src, dst, *a, **k)
        if os.path.basename(str(dst)) in names:
            seen[0] += 1
            if seen[0] == after:
                os.kill(os.getpid(), signal.SIGKILL)
    os.replace = replace
    if os.environ.get("KILL_IN_CHECKPOINT"):
        import torch
        real_save = torch.save
        def save(obj, f, *a, **k):
            real_save(obj, f, *a, **k)
            if ".checkpoint.pt." in str(f):
                os.kill(os.getpid(), signal.SIGKILL)
        torch.save = save
    from cass.cli.app import main
    sys.exit(main(sys.argv[1:]))
""")


def _params_file(tmp_path: Path, demo_root: Path, name: str, **finetune) -> Path:
    raw = tiny_mapping(demo_root)
    raw["finetune"].update({"init": "random", **finetune})
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def _outputs(prepared_dir: Path, root: Path) -> Path:
    """An outputs root holding a copy of the prepared data (the session's copy stays read-only)."""
    shutil.copytree(prepared_dir, root / "data")
    return root


def _finetune(params: Path, outputs: Path, timeout: float = 600, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", _RUNNER, "finetune", "--network", "cnn", "--params", str(params),
         "--outputs", str(outputs), "-q"],
        capture_output=True, text=True, timeout=timeout, env={**os.environ, "PYTHONPATH": str(ROOT), **env},
    )


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _identity(folder: Path) -> tuple:
    """What makes a fine-tuning output set one run's: its weights, spec, curves, lineage and summary (without
    the timings, which differ between equal runs)."""
    history = pd.read_csv(folder / "history.csv").drop(columns=["epoch_seconds"])
    metrics = json.loads((folder / "metrics.json").read_text())
    lineage = json.loads((folder / "lineage.json").read_text())
    return (_digest(folder / "model.safetensors"), _digest(folder / "model.json"), history.to_csv(index=False),
            lineage["weights_sha256"], lineage["settings"]["finetune"]["lr"],
            metrics["epochs_run"], metrics["best_epoch"], metrics["best_val_loss"])


@pytest.mark.slow
def test_a_kill_while_fine_tuning_publishes_leaves_one_whole_set(prepared_dir: Path, demo_root: Path,
                                                                  tmp_path: Path) -> None:
    outputs = _outputs(prepared_dir, tmp_path / "out")
    folder = FinetuneOutputs(outputs / "finetune" / "cnn").out_dir
    first = _params_file(tmp_path, demo_root, "first", epochs=1)
    second = _params_file(tmp_path, demo_root, "second", epochs=2, lr=3e-3)
    done = _finetune(first, outputs)
    assert done.returncode == 0, done.stderr
    previous = _identity(folder)
    snapshot = tmp_path / "previous-set"
    shutil.copytree(folder, snapshot)

    seen = {}
    for k in range(1, len(SET_FILES) + 1):  # killed just after each file of the set was written
        shutil.rmtree(folder)
        shutil.copytree(snapshot, folder)
        proc = _finetune(second, outputs, KILL_AFTER=str(k), KILL_NAMES=",".join(SET_FILES))
        assert proc.returncode == -signal.SIGKILL, f"kill {k} did not happen: {proc.stderr[-2000:]}"
        seen[k] = _identity(folder)
    # The interrupted second fine-tuning finishes on a rerun (its checkpoint survived the kill).
    proc = _finetune(second, outputs)
    assert proc.returncode == 0, proc.stderr
    latest = _identity(folder)
    assert latest != previous
    for k, identity in seen.items():
        assert identity in (previous, latest), f"after kill {k}: the folder mixes two runs' outputs"
    assert sorted(p.name for p in folder.iterdir()) == sorted(SET_FILES)  # no checkpoint, no temporary file
    assert not [p for p in folder.parent.iterdir() if p.name.startswith(".")]  # no staging left beside it


@pytest.mark.slow
def test_temporary_files_of_killed_checkpoint_writes_are_removed_at_the_next_start(
        prepared_dir: Path, demo_root: Path, tmp_path: Path) -> None:
    outputs = _outputs(prepared_dir, tmp_path / "out")
    folder = outputs / "finetune" / "cnn"
    params = _params_file(tmp_path, demo_root, "params", epochs=1)
    for _ in range(2):
        proc = _finetune(params, outputs, KILL_IN_CHECKPOINT="1")
        assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
        assert list(folder.glob(".checkpoint.pt.*.tmp"))  # what a killed write leaves
    proc = _finetune(params, outputs)
    assert proc.returncode == 0, proc.stderr
    assert sorted(p.name for p in folder.iterdir()) == sorted(SET_FILES)


def test_a_kill_between_the_two_renames_of_a_swap_is_undone(tmp_path: Path) -> None:
    """Where the filesystem cannot exchange two folders in one step, the swap takes two renames; a kill
    between them leaves the previous set aside, and the next writer puts it back."""
    out = tmp_path / "stage"
    out.mkdir()
    (out / "a.txt").write_text("previous")
    code = textwrap.dedent(f"""
        import os, signal
        from pathlib import Path
        from cass import io
        io._exchange = lambda a, b: False
        real, n = os.rename, [0]
        def rename(src, dst):
            real(src, dst)
            n[0] += 1
            if n[0] == 1:
                os.kill(os.getpid(), signal.SIGKILL)
        os.rename = rename
        with io.output_set(Path({str(out)!r})) as staging:
            (staging / "a.txt").write_text("new")
    """)
    proc = subprocess.run([sys.executable, "-c", code], env={**os.environ, "PYTHONPATH": str(ROOT)},
                          timeout=120)
    assert proc.returncode == -signal.SIGKILL
    assert not out.exists()  # killed between the renames
    cass_io.clean_stale(out)
    assert (out / "a.txt").read_text() == "previous"
    assert not [p.name for p in tmp_path.iterdir() if p.name != "stage"]


# -- a full disk ---------------------------------------------------------------------------------


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A real 32 MiB filesystem (tmpfs), unmounted at teardown."""
    mount = tmp_path / "disk"
    mount.mkdir()
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=32M", "tmpfs", str(mount)], capture_output=True,
                          text=True)
    if proc.returncode != 0:
        service_unavailable(f"cannot mount a size-limited tmpfs for the full-disk tests (needs root or "
                            f"CAP_SYS_ADMIN): {proc.stderr.strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def _fill(disk: Path, leave: int) -> None:
    """Leave ``leave`` bytes free on ``disk``."""
    free = shutil.disk_usage(disk).free
    with open(disk / "filler", "wb") as fh:
        fh.truncate(0)
        fh.write(b"\0" * max(free - leave, 0))
    assert abs(shutil.disk_usage(disk).free - leave) < 64 * 1024


def _sizes(prepared_dir: Path, demo_root: Path, tmp_path: Path) -> tuple[int, int]:
    """(checkpoint, weights) sizes of the second fine-tuning, measured on an ordinary disk."""
    from cass.finetune import finetune

    class Stop(Exception):
        pass

    def stop(_epoch: int, _record: dict) -> None:
        raise Stop

    raw = tiny_mapping(demo_root)
    raw["finetune"].update(init="random", epochs=1, lr=3e-3)
    params = params_from_mapping(raw)
    with pytest.raises(Stop):
        finetune(params, prepared_dir, "cnn", tmp_path / "measure", callbacks=[stop], progress=False)
    checkpoint = (tmp_path / "measure" / "checkpoint.pt").stat().st_size
    out = finetune(params, prepared_dir, "cnn", tmp_path / "measure", progress=False)
    return checkpoint, out.weights.stat().st_size


@pytest.mark.slow
@pytest.mark.parametrize("moment", ["checkpoint", "outputs"])
def test_a_full_disk_is_named_and_leaves_the_previous_outputs(moment: str, small_disk: Path, prepared_dir: Path,
                                                              demo_root: Path, tmp_path: Path) -> None:
    outputs = _outputs(prepared_dir, small_disk / "out")
    folder = outputs / "finetune" / "cnn"
    first = _params_file(tmp_path, demo_root, "first", epochs=1)
    params = _params_file(tmp_path, demo_root, "params", epochs=1, lr=3e-3)
    assert _finetune(first, outputs).returncode == 0
    previous = _identity(folder)
    shutil.rmtree(tmp_path / "measure", ignore_errors=True)
    checkpoint, weights = _sizes(prepared_dir, demo_root, tmp_path)
    assert weights > 256 * 1024, "the weights must outweigh the filesystem's rounding for this test"
    # The checkpoint fits but not the outputs after it / not even the checkpoint.
    _fill(small_disk, checkpoint + weights // 2 if moment == "outputs" else checkpoint // 2)
    proc = _finetune(params, outputs)
    assert proc.returncode == DiskFullError.exit_code, proc.stderr
    err = proc.stderr.strip().splitlines()
    assert "Traceback" not in proc.stderr and err[-1].startswith("error: ")
    named = folder / ("checkpoint.pt" if moment == "checkpoint" else "model.safetensors")
    assert f"{named}: the disk is full" in err[-1] and "needed" in err[-1] and "free" in err[-1]
    assert _identity(folder) == previous  # the previous set stays the current one
    leftovers = [p.name for p in folder.iterdir() if p.name.startswith(".")]
    assert leftovers == [] and not [p for p in folder.parent.iterdir() if p.name.startswith(".")]
    (small_disk / "filler").unlink()
    proc = _finetune(params, outputs)  # with space again, the same command finishes
    assert proc.returncode == 0, proc.stderr
    assert _identity(folder) != previous


def test_disk_full_errors_of_each_writer_are_recognised(tmp_path: Path) -> None:
    """The three ways a writer reports ENOSPC: OSError, safetensors' I/O error text, torch's zip writer."""
    assert cass_io.is_disk_full(OSError(28, "No space left on device"), tmp_path)
    assert cass_io.is_disk_full(RuntimeError("I/O error: No space left on device (os error 28)"), tmp_path)
    assert not cass_io.is_disk_full(RuntimeError("unexpected pos 10 vs 20"), tmp_path)  # space is left here
    assert not cass_io.is_disk_full(ValueError("bad value"), tmp_path)
    assert cass_io.human_bytes(3 * 1024 * 1024) == "3.0 MiB"
