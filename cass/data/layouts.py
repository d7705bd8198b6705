"""The registry of dataset layouts: the ways a dataset folder can be organised, as ``data.layout`` names them.

(Not to be confused with :mod:`cass.outputs`, which names the platform's *output* paths.)

Settings validation, ``cass data prepare``, ``cass data add`` and the CLI's ``--layout`` choices all read
this registry, so a new layout is one adapter class and one ``@register_layout``::

    @register_layout
    class DicomFolder(DatasetLayout):
        name = "dicomfolder"
        help = "<root>/<class>/*.dcm"

        def list_files(self, data, problems):
            from cass.data.adapters import ...   # the reading code, imported when used
            return ...

This module imports nothing heavy (it is imported by :mod:`cass.config`, which must stay quick to
import): the adapters import their readers (pandas, numpy, Pillow) inside their methods.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar, TypeVar

from cass.errors import ConfigError, did_you_mean

if TYPE_CHECKING:
    from cass.config import DataConfig
    from cass.data.adapters import AdapterResult
    from cass.data.problems import Problems


class UnknownLayoutError(ConfigError, ValueError):
    """``data.layout`` (or ``--layout``) names no registered layout. A ValueError too, so that settings
    validation reports it under the key ``data.layout``."""


class DatasetLayout(ABC):
    """How one kind of dataset is read. Subclasses set the class attributes and implement ``list_files``."""

    name: ClassVar[str]
    help: ClassVar[str]
    settings: ClassVar[Mapping[str, str]] = {}
    """``data.*`` keys this layout needs -> what to put there (checked when the settings are loaded)."""

    def missing_settings(self, data: DataConfig) -> list[str]:
        """The required ``data.*`` settings that are not set, each with what to put there."""
        return [f"data.{key} is not set ({what})" for key, what in self.settings.items() if not getattr(data, key)]

    def multilabel(self, data: DataConfig) -> bool | None:
        """Whether images carry several labels, as far as the settings alone tell; None when only the data does.

        Settings that follow from the task (``quality.expected_metrics: auto``) are derived from it."""
        return False

    @abstractmethod
    def list_files(self, data: DataConfig, problems: Problems) -> AdapterResult:
        """Every image with its labels (and predefined split, group), read without decoding or writing
        anything; each referenced file is checked to exist. Row faults go to ``problems``."""

    def load(self, data: DataConfig, work_dir: Path, problems: Problems) -> AdapterResult:
        """The rows ``cass data prepare`` hashes and decodes. Layouts whose images are not plain files (an
        archive) write them under ``work_dir`` here; for the others this is ``list_files``."""
        return self.list_files(data, problems)


_LAYOUTS: dict[str, DatasetLayout] = {}

L = TypeVar("L", bound=type[DatasetLayout])


def register_layout(cls: L) -> L:
    """Class decorator: make ``cls`` available as ``data.layout: <cls.name>``."""
    name = getattr(cls, "name", "")
    if not name or not name.isidentifier() or name != name.lower():
        raise ValueError(f"{cls.__name__}: a layout name must be a lowercase identifier, got {name!r}")
    if name in _LAYOUTS and type(_LAYOUTS[name]) is not cls:
        raise ValueError(f"layout {name!r} is registered twice ({type(_LAYOUTS[name]).__name__}, {cls.__name__})")
    _LAYOUTS[name] = cls()
    return cls


def layout_names() -> tuple[str, ...]:
    """The registered layout names, in registration order: the choices of ``data.layout`` and ``--layout``."""
    return tuple(_LAYOUTS)


def layout_help() -> str:
    """One line per layout, ``name: help``, for command-line help."""
    return "\n".join(f"{name}: {layout.help}" for name, layout in _LAYOUTS.items())


def get_layout(name: str) -> DatasetLayout:
    """The registered layout ``name``; an error naming the known ones (and the closest) otherwise."""
    try:
        return _LAYOUTS[name]
    except (KeyError, TypeError):
        raise UnknownLayoutError(
            f"unknown layout {name!r}{did_you_mean(name, _LAYOUTS)} Known layouts: {', '.join(_LAYOUTS)}"
        ) from None


# --------------------------------------------------------------------------------------------------
# The built-in layouts


@register_layout
class ImageFolder(DatasetLayout):
    name = "imagefolder"
    help = (
        "<root>/<class>/<image>, or with predefined splits <root>/<Training|Testing|...>/<class>/<image> "
        "(Brain Tumor MRI)"
    )

    def list_files(self, data: DataConfig, problems: Problems) -> AdapterResult:
        from cass.data.adapters import imagefolder

        return imagefolder(Path(data.root), problems)


@register_layout
class OneHotCsv(DatasetLayout):
    name = "csv"
    help = "a CSV of image ids with one-hot label columns (ISIC 2019), described by data.csv"
    settings: ClassVar[Mapping[str, str]] = {"csv": "data.csv.file, plus image_column, image_dir... as needed"}

    def multilabel(self, data: DataConfig) -> bool | None:
        return data.csv.multilabel if data.csv is not None else False

    def list_files(self, data: DataConfig, problems: Problems) -> AdapterResult:
        from cass.data.adapters import csv_onehot

        if data.csv is None:  # settings validation checks `settings` first; this is for direct callers
            raise ConfigError("data.layout is 'csv' but data.csv is not set")
        return csv_onehot(Path(data.root), data.csv, data.group_column, problems)


@register_layout
class MedMnist(DatasetLayout):
    name = "medmnist"
    help = "a MedMNIST .npz file (train/val/test arrays) named by data.medmnist_file; images extracted once"
    settings: ClassVar[Mapping[str, str]] = {"medmnist_file": "the .npz file, relative to data.root"}

    def multilabel(self, data: DataConfig) -> bool | None:
        return None  # the label arrays tell (ChestMNIST is multi-label)

    def _npz(self, data: DataConfig) -> Path:
        return Path(data.root) / str(data.medmnist_file)

    def list_files(self, data: DataConfig, problems: Problems) -> AdapterResult:
        from cass.data.adapters import medmnist

        return medmnist(self._npz(data), None, data.classes, problems)

    def load(self, data: DataConfig, work_dir: Path, problems: Problems) -> AdapterResult:
        from cass.data.adapters import medmnist

        return medmnist(self._npz(data), work_dir, data.classes, problems)


@register_layout
class DicomFolder(DatasetLayout):
    name = "dicom"
    help = (
        "DICOM files found recursively (*.dcm, or DICOM files without extension) in <root>/<class>/ folders, or "
        "labelled by data.dicom.labels_file; patient IDs become pseudonymous groups (needs CASS_PSEUDONYM_KEY)"
    )

    def list_files(self, data: DataConfig, problems: Problems) -> AdapterResult:
        from cass.data.dicom_folder import dicom_folder

        return dicom_folder(data, None, problems)

    def load(self, data: DataConfig, work_dir: Path, problems: Problems) -> AdapterResult:
        from cass.data.dicom_folder import dicom_folder

        return dicom_folder(data, work_dir, problems)
