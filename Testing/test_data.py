"""fmct.data.manifests and fmct.data.datasets: manifests from folder, CSV, RSNA ICH and CQ500 layouts built from generated DICOMs,
and the on-disk cache of preprocessed volumes (hits, misses, unreadable studies)."""
from __future__ import annotations

import csv
import hashlib
import logging
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

import fmct.data.datasets as data
import fmct.data.manifests as manifests
from fmct.data.datasets import CachedVolumeDataset, collate_skip_none
from fmct.data.manifests import (
    Study,
    load_manifest,
    majority,
    manifest_from_cq500,
    manifest_from_csv,
    manifest_from_folder,
    manifest_from_rsna,
    write_manifest_csv,
)
from fmct.reading.dicom import new_uid, write_dicom_series
from fmct.conventions.errors import ConfigError
from fmct.reading.files import write_volume
from fmct.phantom import write_phantom_set
from fmct.conventions.tasks import TASKS
from fmct.preprocessing.spec import PreprocessSpec, Window
from fmct_testing import ball_ct

PATIENT_NAME = "DOE^JANE"
PATIENT_ID = "PID-5551234"
SPEC = PreprocessSpec(spacing_mm=(12.0, 12.0, 12.0), size=(16, 16, 16))


def small_ct(radius: float = 15.0):
    volume, _ = ball_ct(shape_zyx=(8, 32, 32), spacing=(6.0, 6.0, 12.0), ball_radius_mm=radius)
    return volume


def write_series(folder: Path, radius: float = 15.0, **kw) -> list[Path]:
    return write_dicom_series(small_ct(radius), folder, patient_name=PATIENT_NAME, patient_id=PATIENT_ID, **kw)


def write_csv(path: Path, rows: list[list]) -> Path:
    with open(path, "w", newline="") as fh:
        csv.writer(fh).writerows(rows)
    return path


def folder_of_studies(root: Path) -> Path:
    """Two DICOM studies and one NIfTI study, as a folder layout."""
    write_series(root / "case_a", 15.0)
    write_series(root / "case_b", 20.0)
    write_volume(small_ct(10.0), root / "case_c.nii.gz")
    return root


# --------------------------------------------------------------------------------------------
# Manifests
# --------------------------------------------------------------------------------------------

def test_folder_manifest_with_labels_csv(tmp_path):
    root = folder_of_studies(tmp_path / "studies")
    labels = write_csv(tmp_path / "labels_ext.csv", [
        ["study_id", "any_hemorrhage", "fracture", "scanner"],
        ["case_a", "1", "", "x"], ["case_c", "0", "1", "y"],
    ])
    manifest = manifest_from_folder(root, labels_csv=labels)
    assert [s.study_id for s in manifest] == ["case_a", "case_b", "case_c"]
    by_id = {s.study_id: s for s in manifest}
    assert by_id["case_a"].labels == {"any_hemorrhage": 1, "fracture": None}
    assert by_id["case_b"].labels == {}
    assert by_id["case_c"].path.name == "case_c.nii.gz" and by_id["case_c"].labels["fracture"] == 1
    assert manifest.tasks == ["any_hemorrhage", "fracture"]  # "scanner" is not 0/1, so not a label
    assert [s.study_id for s in load_manifest(root)] == ["case_a", "case_b", "case_c"]


def test_csv_manifest_round_trip_and_bad_label(tmp_path):
    root = folder_of_studies(tmp_path / "studies")
    write_csv(root / "labels.csv", [
        ["case_id", "path", "subdural", "epidural", "slice_thickness_mm", "anatomy"],
        ["a", "case_a", "1", "0", "4.5", "default"],
        ["c", "case_c.nii.gz", "NA", "1", "5", "default"],
    ])
    manifest = load_manifest(root)  # labels.csv with a path column: the phantom-set layout
    assert [s.study_id for s in manifest] == ["a", "c"]
    assert manifest[0].path == root / "case_a" and manifest[1].labels == {"subdural": None, "epidural": 1}
    assert manifest.tasks == ["subdural", "epidural"]

    again = manifest_from_csv(write_manifest_csv(manifest, tmp_path / "out" / "manifest.csv"))
    assert [(s.study_id, s.path.resolve(), s.labels) for s in again] == \
        [(s.study_id, s.path.resolve(), s.labels) for s in manifest]

    bad = write_csv(tmp_path / "bad.csv", [["path", "subdural"], ["x", "2"]])
    with pytest.raises(ConfigError, match="subdural"):
        manifest_from_csv(bad, label_columns=["subdural"])
    with pytest.raises(ConfigError, match="path"):
        manifest_from_csv(bad, path_column="file")


def test_phantom_set_loads_as_csv_manifest(tmp_path):
    root = write_phantom_set(tmp_path / "set", 2, seed=1, in_plane_size=64)
    manifest = load_manifest(root)
    assert [s.study_id for s in manifest] == ["phantom_00000", "phantom_00001"]
    assert manifest.tasks == list(TASKS)  # slice_thickness_mm and anatomy are not labels
    dataset = CachedVolumeDataset(manifest, SPEC, tmp_path / "cache")
    assert len(dataset) == 2 and dataset[1]["labels"].shape == (len(TASKS),)


def rsna_tree(root: Path) -> tuple[Path, dict[str, list[str]]]:
    """Two series of two studies, slices renamed ID_<hex>.dcm and mixed in one flat folder."""
    images = root / "stage_2_train"
    names: dict[str, list[str]] = {}
    for key, radius in (("pos", 15.0), ("neg", 20.0)):
        study_uid = new_uid()
        tmp = root / f"tmp_{key}"
        names[study_uid] = []
        for p in write_series(tmp, radius, study_uid=study_uid, series_uid=study_uid + ".2"):
            name = "ID_" + hashlib.sha256(p.read_bytes()).hexdigest()[:9]
            images.mkdir(parents=True, exist_ok=True)
            p.rename(images / f"{name}.dcm")
            names[study_uid].append(name)
        tmp.rmdir()
    pos, neg = names.values()
    rows = [["ID", "Label"]]
    for i, name in enumerate(pos):
        bleed = int(i == 3)
        rows += [[f"{name}_{sub}", str(bleed if sub in ("subdural", "any") else 0)] for sub in manifests.RSNA_SUBTYPES]
    for name in neg:
        rows += [[f"{name}_{sub}", "0"] for sub in manifests.RSNA_SUBTYPES]
    write_csv(root / "stage_2_train.csv", rows)
    return images, names


def test_rsna_groups_slices_by_header_uids_and_any_slice_is_positive(tmp_path):
    images, names = rsna_tree(tmp_path)
    first_slice = sorted(images.iterdir())[0]
    (images / "ID_000bad000.dcm").write_bytes(first_slice.read_bytes()[:200])  # truncated header
    manifest = load_manifest(tmp_path)
    assert len(manifest) == 2 and manifest.skipped == [str(images / "ID_000bad000.dcm")]
    by_files = {frozenset(f.stem for f in s.files): s for s in manifest}
    pos, neg = (by_files[frozenset(n)] for n in names.values())
    assert pos.labels["subdural"] == 1 and pos.labels["any_hemorrhage"] == 1 and pos.labels["epidural"] == 0
    assert all(v == 0 for v in neg.labels.values())
    for s in manifest:
        assert s.study_id.startswith("rsna-") and s.series_uid not in s.study_id
    dataset = CachedVolumeDataset(manifest, SPEC, tmp_path / "cache", tasks=["any_hemorrhage", "subdural"])
    items = {dataset[i]["study_id"]: dataset[i] for i in range(len(dataset))}
    assert items[pos.study_id]["labels"].tolist() == [1.0, 1.0]
    assert items[pos.study_id]["image"].shape == (3, 16, 16, 16) and dataset.skipped == []

    saved = manifest_from_csv(write_manifest_csv(manifest, tmp_path / "rsna_manifest.csv"))
    assert [(s.study_id, s.series_uid, s.files, s.labels) for s in saved] == \
        [(s.study_id, s.series_uid, s.files, s.labels) for s in manifest]

    unlabeled = manifest_from_rsna(images)
    assert len(unlabeled) == 2 and all(s.labels == {} for s in unlabeled)


def test_cq500_majority_of_three_readers(tmp_path):
    for n, radius in ((0, 15.0), (1, 20.0)):
        series = tmp_path / f"CQ500CT{n} CQ500CT{n}" / "Unknown Study" / "CT 5mm"
        for k, p in enumerate(write_series(series, radius)):
            p.rename(series / f"CT{k:06d}.dcm")
    findings = ["ICH", "IPH", "IVH", "SDH", "EDH", "SAH", "BleedLocation-Left", "Fracture", "MassEffect",
                "MidlineShift"]
    header = ["name", "Category"] + [f"R{r}:{f}" for r in (1, 2, 3) for f in findings]

    def row(name, votes):  # votes: finding -> (r1, r2, r3); others 0
        return [name, "x"] + [str(votes.get(f, (0, 0, 0))[r]) for r in range(3) for f in findings]

    write_csv(tmp_path / "reads.csv", [
        header,
        row("CQ500-CT-0", {"ICH": (1, 1, 0), "SDH": (0, 1, 1), "Fracture": (1, 0, 0)}),
        row("CQ500-CT-1", {"ICH": (1, 0, 0)}),
        row("CQ500-CT-7", {}),  # no folder: counted in the log, not an error
    ])
    manifest = load_manifest(tmp_path)
    assert [s.study_id for s in manifest] == ["CQ500-CT-0", "CQ500-CT-1"]
    first, second = manifest
    assert first.labels["any_hemorrhage"] == 1 and first.labels["subdural"] == 1 and first.labels["fracture"] == 0
    assert second.labels["any_hemorrhage"] == 0 and "BleedLocation-Left" not in first.labels
    assert set(first.labels) == set(manifests.CQ500_FINDINGS.values())
    assert manifest_from_cq500(tmp_path)[0].labels == {}
    assert majority([1, None, 0]) == 0 and majority([1, 1, None]) == 1 and majority([None]) is None


# --------------------------------------------------------------------------------------------
# Cache
# --------------------------------------------------------------------------------------------

def test_cache_serves_second_epoch_without_sources_and_spec_change_misses(tmp_path, monkeypatch):
    root = folder_of_studies(tmp_path / "studies")
    manifest = manifest_from_folder(root)
    for s in manifest:
        s.labels = {"any_hemorrhage": 1 if s.study_id == "case_a" else None}
    cache = tmp_path / "cache"
    dataset = CachedVolumeDataset(manifest, SPEC, cache).prepare()
    assert dataset.stats == {"hits": 0, "decoded": 3} and len(dataset) == 3
    first = [dataset[i] for i in range(3)]
    assert first[0]["image"].dtype == torch.float32 and first[0]["image"].shape == (3, 16, 16, 16)
    assert first[0]["labels"].tolist() == [1.0] and math.isnan(first[1]["labels"][0])

    files = sorted(cache.iterdir())
    assert len(files) == 3 and all(f.suffix == ".npy" for f in files)  # no .tmp left, no pickle
    assert np.load(files[0], allow_pickle=False).dtype == np.float16

    moved = tmp_path / "moved"
    root.rename(moved)  # second epoch: the sources are gone, the cache serves every item
    second = [dataset[i] for i in range(3)]
    for a, b in zip(first, second):
        assert torch.equal(a["image"], b["image"]) and a["study_id"] == b["study_id"]
    moved.rename(root)

    def no_decoding(study):
        raise AssertionError("decoded a study that is cached")

    monkeypatch.setattr(data, "read_study", no_decoding)
    again = CachedVolumeDataset(manifest, SPEC, cache).prepare()  # a new run: hits only
    assert again.stats == {"hits": 3, "decoded": 0} and again.skipped == []
    monkeypatch.undo()

    other = PreprocessSpec(windows=(Window("brain", 40, 80),), spacing_mm=(12.0, 12.0, 12.0), size=(16, 16, 16))
    changed = CachedVolumeDataset(manifest, other, cache).prepare()
    assert changed.stats == {"hits": 0, "decoded": 3} and changed[0]["image"].shape == (1, 16, 16, 16)

    (root / "case_c.nii.gz").touch()  # a changed source file misses too
    assert CachedVolumeDataset(manifest, SPEC, cache).prepare().stats == {"hits": 2, "decoded": 1}


def test_unreadable_study_is_skipped_counted_and_logged_without_patient_data(tmp_path, caplog):
    root = folder_of_studies(tmp_path / "studies")
    broken = write_series(root / "case_broken", 15.0)[3]
    broken.write_bytes(broken.read_bytes()[:200])  # truncated: header cut off
    manifest = manifest_from_folder(root)
    fractions = []
    with caplog.at_level(logging.DEBUG):
        dataset = CachedVolumeDataset(manifest, SPEC, tmp_path / "cache")
        dataset.prepare(progress=lambda f, m: fractions.append(f))
    assert len(dataset) == 3 and [s.study_id for s in dataset.skipped] == ["case_broken"]
    assert fractions[-1] == 1.0
    assert str(root / "case_broken") in caplog.text
    assert PATIENT_NAME.split("^")[0] not in caplog.text and PATIENT_ID not in caplog.text
    assert "case_broken" not in [s.study_id for s in dataset.studies]

    batches = list(DataLoader(dataset, batch_size=2, collate_fn=collate_skip_none))
    assert [b["image"].shape[0] for b in batches] == [2, 1]

    next(iter(dataset.cache_dir.iterdir())).unlink()  # a cache file vanishes mid-run: rebuilt
    assert all(dataset[i] is not None for i in range(len(dataset)))


def test_missing_source_is_skipped_and_collate_drops_none(tmp_path):
    manifest = [Study("gone", tmp_path / "nowhere.nii.gz")]
    dataset = CachedVolumeDataset(manifest, SPEC, tmp_path / "cache")
    assert len(dataset) == 0 and len(dataset.skipped) == 1
    assert collate_skip_none([None]) is None
