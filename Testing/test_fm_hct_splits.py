"""FM-HCT's split files as manifests (issue 28 item 4), on a generated tree in their layout.

Their `datasets/*/*_label.csv` list one row per series (img_path, the label columns, name = the study);
the paths point at the authors' machine, so --path-prefix OLD=NEW points them at the user's copy.
"""
from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest

from fmct.cli import main
from fmct.conventions.errors import ConfigError
from fmct.data.manifests import load_manifest
from fmct.phantom import make_phantom
from fmct.reading.files import write_volume
from fmct.train.evaluate_bundle import pool_by_study
from fmct.train.finetune import split

COLUMNS = ["img_path", "ICH", "IPH", "IVH", "SDH", "EDH", "SAH", "BleedLocation-Left", "Fracture", "CalvarialFracture",
           "MassEffect", "MidlineShift", "Reader", "name"]
OLD = "/gpfs/data/their_lab/CQ500"
# study -> (series, ICH, SDH, Fracture, MassEffect); series of one study share the study's labels
STUDIES = {"CQ500-CT-1": (2, 1, 1, 0, 1), "CQ500-CT-2": (3, 0, 0, 1, 0), "CQ500-CT-3": (1, 1, 0, 0, 0),
           "CQ500-CT-4": (2, 0, 0, 0, 0)}


@pytest.fixture(scope="module")
def tree(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("fmhct_splits")
    copy = root / "my_copy"
    rows, seed = [], 0
    for study, (n_series, ich, sdh, fracture, mass) in STUDIES.items():
        for k in range(n_series):
            seed += 1
            rel = f"{study}/series_{k}.nii.gz"
            write_volume(make_phantom(seed, findings=[], slices="thick", in_plane_size=48).volume, copy / rel)
            rows.append({"img_path": f"{OLD}/{rel}", "ICH": ich, "IPH": 0, "IVH": 0, "SDH": sdh, "EDH": 0, "SAH": 0,
                         "BleedLocation-Left": 1, "Fracture": fracture, "CalvarialFracture": fracture, "MassEffect": mass,
                         "MidlineShift": "", "Reader": "R1", "name": study})
    csv_path = root / "datasets" / "cq500" / "cq500_label.csv"
    csv_path.parent.mkdir(parents=True)
    with open(csv_path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    return csv_path, copy


def test_split_csv_is_a_manifest_with_fmct_tasks_and_studies(tree):
    csv_path, copy = tree
    manifest = load_manifest(csv_path, path_prefix=f"{OLD}={copy}")
    assert len(manifest) == 8
    assert manifest.tasks == ["any_hemorrhage", "intraparenchymal", "intraventricular", "subarachnoid", "subdural",
                              "epidural", "fracture", "mass_effect", "midline_shift"]
    first = manifest[0]
    assert first.study_id == "CQ500-CT-1/series_0" and first.group == "CQ500-CT-1"
    assert first.path == copy / "CQ500-CT-1" / "series_0.nii.gz" and first.path.is_file()
    assert first.labels["any_hemorrhage"] == 1 and first.labels["subdural"] == 1 and first.labels["mass_effect"] == 1
    assert first.labels["midline_shift"] is None  # empty: unknown, not negative
    assert "BleedLocation-Left" not in first.labels and "CalvarialFracture" not in first.labels
    assert {s.study for s in manifest} == set(STUDIES)


def test_wrong_prefix_is_refused_naming_the_line(tree):
    csv_path, _ = tree
    with pytest.raises(ConfigError, match="line 2.*does not start with"):
        load_manifest(csv_path, path_prefix="/somewhere/else=/x")
    with pytest.raises(ConfigError, match="OLD=NEW"):
        load_manifest(csv_path, path_prefix="no-equals-sign")
    with pytest.raises(ConfigError, match="applies to FM-HCT"):
        load_manifest(csv_path.parent, layout="folder", path_prefix=f"{OLD}=/x")


def test_validation_split_keeps_each_study_whole(tree):
    csv_path, copy = tree
    manifest = load_manifest(csv_path, path_prefix=f"{OLD}={copy}")
    for seed in range(6):
        train, val = split(manifest, 0.25, seed)
        assert len(train) + len(val) == len(manifest)
        assert not {s.study for s in train} & {s.study for s in val}
        assert len({s.study for s in val}) == 1  # a quarter of 4 studies, with all their series


def test_study_level_pooling():
    labels = np.array([[0.0, np.nan], [1.0, np.nan], [0.0, 0.0]])
    probs = np.array([[0.2, 0.1], [0.7, 0.3], [0.4, 0.9]])
    y, p = pool_by_study(labels, probs, ["a", "a", "b"])
    assert np.array_equal(y[0], [1.0, np.nan], equal_nan=True) and np.array_equal(y[1], [0.0, 0.0])
    assert np.allclose(p, [[0.7, 0.3], [0.4, 0.9]])


def test_embed_reads_the_split_file_through_the_prefix(tree, tmp_path):
    from fmct_testing import tiny_bundle

    csv_path, copy = tree
    bundle, _, _ = tiny_bundle(tmp_path / "bundle")
    out = tmp_path / "f.npz"
    assert main(["embed", str(csv_path), "--model", str(bundle), "--out", str(out), "--device", "cpu",
                 "--path-prefix", f"{OLD}={copy}"]) == 0
    with np.load(out, allow_pickle=False) as f:
        assert list(f["study_id"])[:2] == ["CQ500-CT-1/series_0", "CQ500-CT-1/series_1"]
        assert f["cls"].shape[0] == 8 and list(f["tasks"])[0] == "any_hemorrhage"
    assert main(["embed", str(csv_path), "--model", str(bundle), "--out", str(tmp_path / "g.npz"), "--device", "cpu",
                 "--path-prefix", "/wrong=/x"]) == 2


def test_probe_folds_keep_each_study_whole(tree, tmp_path):
    """Features from the split file carry each row's study; the probe deals whole studies into folds."""
    from fmct.features.probe import grouped_folds, probe
    from fmct_testing import tiny_bundle

    csv_path, copy = tree
    bundle, _, _ = tiny_bundle(tmp_path / "bundle")
    out = tmp_path / "f.npz"
    assert main(["embed", str(csv_path), "--model", str(bundle), "--out", str(out), "--device", "cpu",
                 "--path-prefix", f"{OLD}={copy}"]) == 0
    with np.load(out, allow_pickle=False) as f:
        studies = [str(s) for s in f["study"]]
    assert studies == [s for s, (n, *_) in STUDIES.items() for _ in range(n)]
    y = np.array([1, 1, 0, 0, 0, 1, 0, 0])  # any_hemorrhage per series
    folds = grouped_folds(y, studies, 2, seed=0)
    assert sorted(np.concatenate(folds).tolist()) == list(range(8))
    for fold in folds:
        inside = {studies[i] for i in fold}
        assert not inside & {studies[i] for i in range(8) if i not in fold}
    report = probe(out, tasks=["any_hemorrhage"], folds=2, n_boot=50)
    entry = report["tasks"]["any_hemorrhage"]
    assert entry["n"] == 8 and entry["studies"] == 4 and entry["positive_studies"] == 2 and "knn" in entry
