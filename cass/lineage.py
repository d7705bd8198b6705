"""Where a result came from: the git commit and the data version (DVC md5) of the run."""

from __future__ import annotations

import subprocess
from pathlib import Path

import yaml


def git_commit(cwd: Path | None = None) -> str:
    """The current commit, with ``-dirty`` appended when tracked files have uncommitted changes."""
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, check=True, timeout=10
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=cwd,
            capture_output=True,
            text=True,
            check=True,
            timeout=10,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""
    return f"{sha}-dirty" if dirty else sha


def data_version(data_root: str | Path, project_dir: Path | None = None) -> str:
    """The md5 DVC recorded for the dataset directory (``<root>.dvc`` or ``data.dvc``), or ''.

    The md5 identifies the exact bytes of the dataset: ``dvc checkout`` of that version restores them.
    """
    project_dir = project_dir or Path.cwd()
    root = Path(data_root)
    candidates = [project_dir / f"{root}.dvc", project_dir / "data.dvc"]
    for dvc_file in candidates:
        if not dvc_file.is_file():
            continue
        try:
            doc = yaml.safe_load(dvc_file.read_text()) or {}
        except yaml.YAMLError:
            continue
        for out in doc.get("outs", []):
            path = Path(str(out.get("path", "")))
            target = (dvc_file.parent / path).resolve()
            if target == (project_dir / root).resolve() or (project_dir / root).resolve().is_relative_to(target):
                return str(out.get("md5", ""))
    return ""
