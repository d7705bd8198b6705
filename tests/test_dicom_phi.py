"""No protected health information leaves the data folder: PHI planted in every identifying attribute (and in the
folder names, as PACS exports do) of a DICOM set, the whole retraining flow run on it (prepare, the gates,
pretraining, fine-tuning, evaluation, registration and promotion, on a real Prefect server and a real MLflow store),
a prediction with `cass predict`; then every file written, the MLflow store, the Prefect database and the console
are searched for each value."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from cass.cli import main
from cass.data.dicom_demo import ct_slice, write_dicom
from cass.data.pseudonyms import KEY_VARIABLE, pseudonym
from tests.conftest import LENIENT_MODEL_GATE, tiny_mapping

pytestmark = pytest.mark.slow

KEY = "phi-test-key-0123456789abcdef"
PREFIX = "cass-phi"


def _phi(patient: int) -> dict[str, str]:
    """Distinctive identifying values of one patient: each must never be found outside the export."""
    n, d = f"{patient:02d}", f"{patient + 10:02d}"  # d: a valid day of the month
    return {
        "PatientName": f"Quixote^Zebulon{n}^Amadeus", "PatientID": f"PIDX7731{n}", "PatientBirthDate": f"194703{d}",
        "OtherPatientIDs": f"OPIDQ4491{n}", "PatientAddress": f"12 Rue Fictive {n} Lyon",
        "PatientTelephoneNumbers": f"555-0199-3{n}", "PatientMotherBirthName": f"Vandersloot{n}",
        "AccessionNumber": f"ACCNZ9081{n}", "StudyID": f"STYQ552{n}", "StudyDate": f"201807{d}",
        "SeriesDate": f"201808{d}", "AcquisitionDate": f"201809{d}", "ContentDate": f"201810{d}",
        "StudyTime": f"1422{n}.5", "ReferringPhysicianName": f"Wendeline^Doctor{n}",
        "InstitutionName": f"Saint Ottokar Hospital {n}", "InstitutionAddress": f"99 Hidden Lane {n}",
        "OperatorsName": f"Hildegard^Operator{n}", "PerformingPhysicianName": f"Bartholomew^Rad{n}",
        "DeviceSerialNumber": f"SNPHI8841{n}", "StudyInstanceUID": f"1.2.826.0.1.3680043.9.7731.{patient}",
        "SeriesInstanceUID": f"1.2.826.0.1.3680043.9.7732.{patient}", "PatientAge": f"0{60 + patient}Y",
    }


def _export(root: Path) -> tuple[list[str], dict[str, str]]:
    """Two classes, 6 patients of 3 slices; each patient's folder is named by its ID. Returns the PHI values
    and the path of each file by its SOPInstanceUID (itself an identifier)."""
    rng = np.random.default_rng(3)
    values: list[str] = []
    files: dict[str, str] = {}
    for patient in range(6):
        label = ("lesion", "normal")[patient % 2]
        phi = _phi(patient)
        values += [v for k, v in phi.items() if k != "PatientAge"] + [phi["PatientAge"]]
        for s in range(3):
            uid = f"1.2.826.0.1.3680043.9.7733.{patient}.{s}"
            rel = f"{label}/{phi['PatientID']}/{phi['AccessionNumber']}_{s}.dcm"
            write_dicom(root / rel, ct_slice(label == "lesion", 32, rng), SOPInstanceUID=uid, Modality="CT",
                        Manufacturer=("Acme", "Globex")[patient % 2], PatientSex="MF"[patient % 2],
                        BodyPartExamined="CHEST", RescaleSlope=1, RescaleIntercept=-1024, WindowCenter=40,
                        WindowWidth=400, PixelSpacing=[0.7, 0.7],
                        BurnedInAnnotation="YES" if (patient, s) == (0, 0) else "NO", **phi)
            files[rel] = uid
            values.append(uid)
    return values, files


def _found(folder: Path, values: list[str]) -> dict[str, list[str]]:
    """Each value found in a file's content or path under ``folder``, with where."""
    hits: dict[str, list[str]] = {}
    for path in sorted(folder.rglob("*")):
        if path.is_file() and not path.is_symlink():
            data, name = path.read_bytes(), str(path.relative_to(folder)).encode()
            for v in values:
                if v.encode() in data or v.encode() in name:
                    hits.setdefault(v, []).append(str(path.relative_to(folder)))
    return hits


def _records_since(database: Path, since: pd.Timestamp) -> bytes:
    """The rows of every table of a Prefect SQLite database written or updated since ``since``, as text."""
    import sqlite3

    connection = sqlite3.connect(f"file:{database}?mode=ro", uri=True)
    try:
        text = []
        for (table,) in connection.execute("SELECT name FROM sqlite_master WHERE type = 'table'").fetchall():
            columns = [row[1] for row in connection.execute(f'PRAGMA table_info("{table}")')]
            if "updated" not in columns:
                continue
            at = columns.index("updated")
            for row in connection.execute(f'SELECT * FROM "{table}"'):
                updated = pd.Timestamp(row[at]) if row[at] else None
                if updated is not None and (updated if updated.tzinfo else updated.tz_localize("UTC")) >= since:
                    text.append(repr(row))
        return "\n".join(text).encode()
    finally:
        connection.close()


def _prefect_leaks(database: Path, values: list[str], before: dict[str, list[str]], since: pd.Timestamp) -> list[str]:
    """The values this test's flow wrote to the Prefect database. The session's database also holds the records
    of other tests' flows, and a short value (an age such as 064Y) can occur in them by chance: a value the
    database files held before this flow ran counts only if a record written since holds it."""
    after = _found(database.parent, values)
    records = _records_since(database, since) if set(after) & set(before) else b""
    return [v for v in after if v not in before or v.encode() in records]


def test_no_phi_reaches_outputs_mlflow_prefect_predictions_or_the_console(
    tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture, prefect_api: str,
) -> None:
    # The session's Prefect server: a second test harness nested in it (its own database) loses the flow's
    # concurrency lease on its first renewal. Its database is searched for the planted values below; what
    # other tests' flows wrote there holds none of them (they are drawn for this test).
    from prefect.settings import PREFECT_SERVER_DATABASE_CONNECTION_URL

    from cass.tracking import reset_client
    from flows.retrain import retrain

    export, work = tmp_path_factory.mktemp("export"), tmp_path_factory.mktemp("work")
    values, files = _export(export)
    assert set(_found(export, values)) == set(values)  # the search finds every planted value where it is
    monkeypatch.chdir(work)  # whatever is written relative to the working directory is searched too
    monkeypatch.setenv(KEY_VARIABLE, KEY)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("MLFLOW_ALLOW_PICKLE_DESERIALIZATION", "false")
    mapping = tiny_mapping(export)
    mapping["data"].update(name="ct-phi", layout="dicom", group_columns=["Manufacturer", "PatientSex", "age_band"],
                           dicom={"window": "soft_tissue"})  # not the files' own 40/400: the spec must carry it
    mapping["finetune"]["epochs"] = 1
    mapping["split"] = {"val": 0.2, "test": 0.35, "seed": 7, "label_fractions": [1.0]}
    mapping["mlflow"] = {"tracking_uri": f"sqlite:///{work}/mlflow.db", "artifact_location": str(work / "mlruns"),
                         "experiment": "cass-phi", "model_prefix": PREFIX, "artifact_retry_delay_s": 0,
                         "open_runs_file": str(work / "open-runs.json")}
    mapping["quality"] = {**LENIENT_MODEL_GATE, "min_images_per_class": 2}
    params_file = work / "params.yaml"
    params_file.write_text(yaml.safe_dump(mapping))
    try:
        database = Path(PREFECT_SERVER_DATABASE_CONNECTION_URL.value().split(":///", 1)[1])
        before, since = _found(database.parent, values), pd.Timestamp.now(tz="UTC") - pd.Timedelta(seconds=1)
        state = retrain(params_file=str(params_file), outputs=str(work / "outputs"), tune_trials=0, return_state=True)
        assert state.is_completed(), state.message
        prefect_hits = _prefect_leaks(database, values, before, since)
        assert b"ct-phi" in _records_since(database, since), "the records searched include this flow's"
        assert _found(database.parent, ["ct-phi"]), "the searched database holds this flow's records"
    finally:
        reset_client()

    # The served model decodes a DICOM file with the training's pixel settings: its probabilities are evaluation's.
    spec = yaml.safe_load((work / "outputs" / "finetune" / "cnn" / "model.json").read_text())
    assert spec["dicom"]["window"] == "soft_tissue"
    evaluated = pd.read_csv(work / "outputs" / "evaluate" / "cnn" / "predictions.csv")
    by_name = {f"{pseudonym(rel, 'image', KEY.encode())}.png": rel for rel in files}
    query = work / "query.dcm"  # a name of one's own: cass predict echoes the paths it is given
    shutil.copy(export / by_name[evaluated["path"].iloc[0]], query)
    assert main(["predict", "--model", f"models:/{PREFIX}-cnn/1", str(query), "--output", str(work / "pred.csv"),
                 "--params", str(params_file), "-q"]) == 0
    predicted = pd.read_csv(work / "pred.csv")
    columns = list(spec["classes"])  # one probability column per class, beside the path and the model's identity
    np.testing.assert_allclose(predicted[columns].to_numpy()[0],
                               evaluated[[f"p_{c}" for c in columns]].to_numpy()[0], atol=1e-5)

    query.unlink()  # the copy of the export's file is the user's, not a record
    console = capfd.readouterr()
    written = _found(work, values)
    assert (work / "mlflow.db").stat().st_size > 0 and any((work / "mlruns").rglob("MLmodel"))
    assert (work / "outputs" / "evaluate" / "cnn" / "subgroups.csv").is_file()
    # What the run said: the console, and the log records (a flow run earlier in this process may have routed
    # the library's loggers away from the console).
    said = console.err + console.out + caplog.text
    assert "burned-in" in said  # the flag is reported, by count
    leaked = {v: where for v, where in written.items()}
    leaked.update({v: ["Prefect database"] for v in prefect_hits})
    leaked.update({v: ["console or log"] for v in values if v in said})
    assert not leaked, leaked
