"""DICOM data on files the tests write with pydicom: the pixel pipeline (rescale, VOI window, MONOCHROME1, colour,
bits stored, frames, compressed syntaxes), the faults of the one-pass report, pseudonymous groups, labels from a
CSV keyed by an attribute, the DICOM checks of the data gate, and `cass data add --layout dicom`."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import yaml
from pydicom.uid import JPEGLSLossless, RLELossless

from cass.config import DicomConfig, params_from_mapping
from cass.data import dicom
from cass.data.dicom_demo import generate_dicom_demo, write_dicom
from cass.data.image_errors import CORRUPT, ImageError
from cass.data.images import decode_image, read_bytes
from cass.data.manifest import read_manifest
from cass.data.prepare import prepare_data
from cass.data.pseudonyms import KEY_VARIABLE, MissingKeyError, pseudonym
from cass.errors import DataError
from tests.conftest import tiny_mapping

KEY = "test-key-0123456789abcdef"


@pytest.fixture(autouse=True)
def pseudonym_key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(KEY_VARIABLE, KEY)


def _pixels(path: Path, settings: DicomConfig | None = None) -> np.ndarray:
    return np.asarray(decode_image(read_bytes(path), path.name, dicom=settings))


def _ct(path: Path, hu: list[float], **attrs) -> Path:
    """A CT row of Hounsfield values, stored as HU + 1024 with the rescale that undoes it."""
    stored = np.tile(np.asarray(hu) + 1024, (4, 1)).astype(np.int16)
    return write_dicom(path, stored, RescaleSlope=1, RescaleIntercept=-1024, Modality="CT", **attrs)


def test_ct_is_rescaled_to_hounsfield_and_windowed_by_the_file_a_preset_or_the_settings(tmp_path: Path) -> None:
    path = _ct(tmp_path / "ct.dcm", [-1000, -160, 40, 240, 1000], WindowCenter=40, WindowWidth=400)
    # The file's window 40/400 spans -160..240 HU: air black, soft tissue mid-grey, bone white.
    assert _pixels(path)[0].tolist() == [0, 0, 128, 255, 255]
    lung = _pixels(path, DicomConfig(window="lung"))[0]  # -600/1500: air is no longer black, -160 is bright
    assert 0 < lung[0] < lung[1] < lung[2] < 255
    manual = _pixels(path, DicomConfig(window="manual", window_center=1000, window_width=2))[0]
    assert manual.tolist() == [0, 0, 0, 0, 255]
    # Min..max spreads the file's own range, -1000..1000 HU: (HU + 1000) / 2000 * 255.
    assert _pixels(path, DicomConfig(window="minmax"))[0].tolist() == [0, 107, 133, 158, 255]


def test_a_sigmoid_voi_function_of_the_file_is_honoured(tmp_path: Path) -> None:
    path = _ct(tmp_path / "ct.dcm", [-1000, -100, 40, 180, 1000], WindowCenter=40, WindowWidth=400,
               VOILUTFunction="SIGMOID")
    # 255 / (1 + exp(-4 (HU - 40) / 400)): a smooth curve, not the linear ramp's 0 / 39 / 128 / 217 / 255.
    assert _pixels(path)[0].tolist() == [0, 50, 128, 205, 255]


def test_bits_stored_masks_the_unused_high_bits(tmp_path: Path) -> None:
    values = np.array([[0, 100, 4095]] * 4, dtype=np.uint16)
    junk = values | 0xF000  # an overlay in bits 12-15, which are not part of the value
    clean = write_dicom(tmp_path / "clean.dcm", values, BitsStored=12, HighBit=11, WindowCenter=2048, WindowWidth=4096)
    dirty = write_dicom(tmp_path / "dirty.dcm", junk, BitsStored=12, HighBit=11, WindowCenter=2048, WindowWidth=4096)
    assert _pixels(dirty).tolist() == _pixels(clean).tolist()
    assert _pixels(clean)[0, 0] == 0 and _pixels(clean)[0, 2] == 255


def test_monochrome1_is_inverted_so_that_high_values_are_dark(tmp_path: Path) -> None:
    values = np.array([[0, 1000]] * 4, dtype=np.uint16)
    mono2 = write_dicom(tmp_path / "m2.dcm", values)
    mono1 = write_dicom(tmp_path / "m1.dcm", values, PhotometricInterpretation="MONOCHROME1")
    assert _pixels(mono2)[0].tolist() == [0, 255]
    assert _pixels(mono1)[0].tolist() == [255, 0]


def test_colour_files_become_rgb(tmp_path: Path) -> None:
    rgb = np.zeros((8, 8, 3), np.uint8)
    rgb[..., 0], rgb[..., 1], rgb[..., 2] = 200, 100, 50
    image = decode_image(read_bytes(write_dicom(tmp_path / "rgb.dcm", rgb, Modality="XC")), "rgb.dcm")
    assert image.mode == "RGB" and np.asarray(image)[0, 0].tolist() == [200, 100, 50]


def test_multi_frame_is_refused_with_the_reason_unless_a_frame_is_chosen(tmp_path: Path) -> None:
    frames = np.stack([np.full((8, 8), v, np.uint16) for v in (0, 500, 1000)])
    frames[:, 0, 0], frames[:, 0, 1] = 1000, 0  # one range in every frame: min..max shows which frame was picked
    path = write_dicom(tmp_path / "cine.dcm", frames)
    with pytest.raises(ImageError) as err:
        _pixels(path)
    assert err.value.kind == dicom.MULTIFRAME
    assert "cine.dcm: holds 3 frames" in str(err.value) and "data.dicom.frame" in str(err.value)
    assert _pixels(path, DicomConfig(frame=1))[1, 1] == 128 and _pixels(path, DicomConfig(frame=2))[1, 1] == 255
    with pytest.raises(ImageError, match="frame 5 is past the last"):
        _pixels(path, DicomConfig(frame=5))


def test_rle_lossless_decodes_like_the_native_file(tmp_path: Path) -> None:
    values = (np.arange(64, dtype=np.uint16).reshape(8, 8) * 37) % 4096
    native = write_dicom(tmp_path / "native.dcm", values)
    rle = write_dicom(tmp_path / "rle.dcm", values, syntax=RLELossless)
    assert dicom.read_dataset(read_bytes(rle), "rle").file_meta.TransferSyntaxUID == RLELossless
    assert _pixels(rle).tolist() == _pixels(native).tolist()


def test_a_compressed_syntax_without_a_decoder_is_refused_naming_it(tmp_path: Path) -> None:
    path = write_dicom(tmp_path / "jls.dcm", np.zeros((8, 8), np.uint16), syntax=JPEGLSLossless)
    with pytest.raises(ImageError) as err:
        _pixels(path)
    assert err.value.kind == dicom.UNSUPPORTED_SYNTAX
    assert "JPEG-LS Lossless Image Compression (1.2.840.10008.1.2.4.80)" in str(err.value)


def _malformed(folder: Path) -> dict[str, str]:
    """One file of each fault, in a class folder, and the kind each must be reported under."""
    header_only = write_dicom(folder / "a" / "header_only.dcm", np.zeros((8, 8), np.uint16))
    ds = dicom.read_dataset(read_bytes(header_only), "x")
    del ds.PixelData
    ds.save_as(header_only)
    report = write_dicom(folder / "a" / "report.dcm", np.zeros((8, 8), np.uint16),
                         SOPClassUID="1.2.840.10008.5.1.4.1.1.88.11")
    ds = dicom.read_dataset(read_bytes(report), "x")
    del ds.PixelData
    ds.save_as(report)
    truncated = write_dicom(folder / "b" / "truncated.dcm", np.zeros((64, 64), np.uint16))
    truncated.write_bytes(truncated.read_bytes()[:-3000])
    write_dicom(folder / "b" / "jls.dcm", np.zeros((8, 8), np.uint16), syntax=JPEGLSLossless)
    return {"a/header_only.dcm": dicom.NO_PIXELS, "a/report.dcm": dicom.NOT_IMAGE_SOP,
            "b/truncated.dcm": CORRUPT, "b/jls.dcm": dicom.UNSUPPORTED_SYNTAX}


def _params(root: Path, **data):
    mapping = tiny_mapping(root)
    mapping["data"].update(layout="dicom", name="ct", **data)
    mapping["quality"] = {"min_images_per_class": 2}
    return params_from_mapping(mapping)


def test_malformed_files_are_faults_of_the_one_pass_report_each_named(tmp_path: Path) -> None:
    root = tmp_path / "scans"
    generate_dicom_demo(root, images_per_class=6, size=32)
    faults = _malformed(root / "lesion")
    with pytest.raises(DataError) as err:
        prepare_data(_params(root), tmp_path / "out" / "data")
    text = str(err.value)
    for rel, kind in faults.items():
        assert f"lesion/{rel}" in text and kind in text, (rel, text)
    assert not (tmp_path / "out" / "data").exists()


def test_patients_stay_whole_under_keyed_pseudonyms_and_no_identifier_reaches_the_manifest(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = tmp_path / "scans"
    generate_dicom_demo(root, images_per_class=12, size=32)
    df, _ = read_manifest(prepare_data(_params(root), tmp_path / "out" / "data"))
    assert df["group"].nunique() == 8 and df.groupby("group")["split"].nunique().max() == 1
    assert df["group"].iloc[0] in {pseudonym(f"DEMO{i:04d}", "patient", KEY.encode()) for i in range(1, 9)}
    manifest = (tmp_path / "out" / "data" / "manifest.csv").read_text()
    assert "DEMO0" not in manifest and "IM000" not in manifest  # neither the IDs nor the PACS file names
    # Another key, other pseudonyms: nobody without the key can recompute them from an ID.
    monkeypatch.setenv(KEY_VARIABLE, "another-key-0123456789")
    other, _ = read_manifest(prepare_data(_params(root), tmp_path / "other" / "data"))
    assert set(other["group"]).isdisjoint(df["group"])
    monkeypatch.delenv(KEY_VARIABLE)
    with pytest.raises(MissingKeyError, match=KEY_VARIABLE):
        prepare_data(_params(root), tmp_path / "nokey" / "data")


def test_labels_from_a_csv_keyed_by_an_attribute_without_quoting_its_values(tmp_path: Path) -> None:
    root = tmp_path / "scans"
    for i in range(8):
        write_dicom(root / f"IMG{i}", np.full((16, 16), i * 100, np.uint16), AccessionNumber=f"ACC-SECRET-{i}",
                    PatientID=f"P{i // 2}", Modality="CT")  # PACS style: no extension
    rows = [f"ACC-SECRET-{i},{'yes' if i % 2 else 'no'}" for i in range(7)]  # IMG7 has no row
    (root / "labels.csv").write_text("AccessionNumber,finding\n" + "\n".join(rows) + "\n")
    settings = {"dicom": {"labels_file": "labels.csv", "labels_key": "AccessionNumber", "labels_column": "finding"}}
    with pytest.raises(DataError) as err:
        prepare_data(_params(root, **settings), tmp_path / "out" / "data")
    assert "IMG7: its AccessionNumber is not in labels.csv" in str(err.value)
    assert "ACC-SECRET" not in str(err.value)
    (root / "IMG7").unlink()
    mapping = tiny_mapping(root)
    mapping["data"].update(layout="dicom", name="ct", dicom={**settings["dicom"], "labels_key": "AccessionNumber"})
    mapping["split"] = {"val": 0.25, "test": 0.25, "seed": 7, "label_fractions": [1.0]}
    mapping["finetune"]["label_fraction"] = 1.0
    mapping["quality"] = {"min_images_per_class": 2}
    df, info = read_manifest(prepare_data(params_from_mapping(mapping), tmp_path / "ok" / "data"))
    assert info.classes == ("no", "yes") and len(df) == 7


def test_data_gate_checks_modality_spacing_photometric_size_and_burned_in_text(tmp_path: Path) -> None:
    from cass.quality import validate_manifest

    root = tmp_path / "scans"
    generate_dicom_demo(root, images_per_class=6, size=32)
    write_dicom(root / "normal" / "X1" / "scout.dcm", np.zeros((32, 32), np.uint16), Modality="DX", PatientID="X1",
                PixelSpacing=[0.7, 0.7])
    write_dicom(root / "normal" / "X2" / "capture.dcm", np.zeros((48, 32), np.uint16), Modality="CT", PatientID="X2",
                BurnedInAnnotation="YES")
    write_dicom(root / "lesion" / "X3" / "wide.dcm", np.zeros((32, 32), np.uint16), Modality="CT", PatientID="X3",
                PixelSpacing=[2.0, 2.0], PhotometricInterpretation="MONOCHROME1")
    params = _params(root, dicom={"allowed_photometric": ["MONOCHROME2"]})
    data_dir = prepare_data(params, tmp_path / "out" / "data")
    result = validate_manifest(params, data_dir, tmp_path / "out" / "quality", raise_on_failure=False)
    failed = {f.check: f for f in (*result.failures, *result.warnings)}
    assert not result.success
    names = set(failed)
    assert {"dicom_modality_expected", "dicom_photometric_allowed", "dicom_pixel_spacing_present",
            "dicom_pixel_spacing_consistent", "dicom_frame_size_consistent", "dicom_no_burned_in_annotation"} <= names
    assert failed["dicom_modality_expected"].severity == "fail"
    assert failed["dicom_no_burned_in_annotation"].severity == "warn"


def test_data_add_checks_every_dicom_file_before_copying(tmp_path: Path) -> None:
    from tests.test_dvc import init_repo, sh

    repo = init_repo(tmp_path / "repo")
    (repo / "params.yaml").write_text(yaml.safe_dump(tiny_mapping(Path("data/demo"))))
    params = (repo / "params.yaml").read_text()
    src = tmp_path / "export"
    generate_dicom_demo(src, images_per_class=6, size=32)
    write_dicom(src / "lesion" / "jls.dcm", np.zeros((8, 8), np.uint16), syntax=JPEGLSLossless)
    out = sh("cass", "data", "add", str(src), "--layout", "dicom", "--name", "ct", cwd=repo, check=False)
    assert out.returncode == DataError.exit_code, out.stderr
    assert "lesion/jls.dcm: is compressed with JPEG-LS" in out.stderr and "nothing was copied" in out.stderr
    assert not (repo / "data").exists() and (repo / "params.yaml").read_text() == params
    (src / "lesion" / "jls.dcm").unlink()
    out = sh("cass", "data", "add", str(src), "--layout", "dicom", "--name", "ct", cwd=repo)
    assert "12 images, 2 classes" in out.stdout
    assert yaml.safe_load((repo / "params.yaml").read_text())["data"]["layout"] == "dicom"
