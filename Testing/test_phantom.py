"""Synthetic head CTs: reproducible, labelled as asked, plausible HU, masks where the lesions are."""
from __future__ import annotations

import csv
import json
from dataclasses import replace
from functools import lru_cache

import numpy as np
import pytest
import SimpleITK as sitk

from fmct.conventions.errors import ConfigError
from fmct.phantom import ANATOMY_PRESETS, make_phantom, write_phantom_set
from fmct.conventions.tasks import HEMORRHAGE_TYPES, TASKS

SIZE = 128
LESIONS = ("intraparenchymal", "intraventricular", "subarachnoid", "subdural", "epidural", "fracture")
QUIET = replace(ANATOMY_PRESETS["default"], noise_hu=(0.0, 0.0))       # noise-free, for geometry


@lru_cache(maxsize=None)
def phantom(seed: int, findings: tuple[str, ...] | None = None, slices: str = "thick", anatomy="default"):
    return make_phantom(seed, findings=findings, slices=slices, in_plane_size=SIZE, anatomy=anatomy)


def head_mask(ph) -> np.ndarray:
    return ph.volume.array > -300


# --------------------------------------------------------------------------------------------
# Reproducibility
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("slices", ["thick", "thin"])
def test_same_seed_same_phantom(slices):
    a = make_phantom(7, findings=["subdural", "fracture"], slices=slices, in_plane_size=96)
    b = make_phantom(7, findings=["subdural", "fracture"], slices=slices, in_plane_size=96)
    assert np.array_equal(a.volume.array, b.volume.array)
    assert a.volume.same_grid(b.volume)
    assert a.masks.keys() == b.masks.keys()
    assert all(np.array_equal(a.masks[k], b.masks[k]) for k in a.masks)
    assert a.info == b.info and a.labels == b.labels


def test_different_seeds_different_heads():
    a, b = phantom(1), phantom(2)
    assert a.info["head_semi_axes_mm"] != b.info["head_semi_axes_mm"]
    assert a.volume.array.shape != b.volume.array.shape or not np.array_equal(a.volume.array, b.volume.array)


def test_same_seed_other_findings_same_head():
    """Anatomy and scan are drawn apart from the findings, so a lesion is the only difference."""
    a, b = phantom(3, ()), phantom(3, ("epidural",))
    assert a.volume.same_grid(b.volume)
    assert a.info["head_semi_axes_mm"] == b.info["head_semi_axes_mm"]
    differs = a.volume.array != b.volume.array
    assert differs.any()
    # away from the lesion the voxels are identical (noise included)
    assert not differs[~_dilate(b.masks["epidural"], 3)].any()


def _dilate(mask: np.ndarray, r: int) -> np.ndarray:
    img = sitk.BinaryDilate(sitk.GetImageFromArray(mask.astype(np.uint8)), [r, r, 1], sitk.sitkBox)
    return sitk.GetArrayFromImage(img).astype(bool)


# --------------------------------------------------------------------------------------------
# Labels and masks
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("finding", LESIONS)
def test_single_finding_labels_and_masks(finding):
    ph = phantom(10 + LESIONS.index(finding), (finding,))
    assert set(ph.labels) == set(TASKS)
    expected = {finding} | ({"any_hemorrhage"} if finding in HEMORRHAGE_TYPES else set())
    assert {t for t, v in ph.labels.items() if v} == expected
    assert set(ph.masks) == expected
    head = head_mask(ph)
    for task, mask in ph.masks.items():
        assert mask.dtype == bool and mask.shape == ph.volume.array.shape
        assert mask.sum() > 0, task
        assert head[mask].mean() > 0.95, f"{task} mask leaves the head"


def test_normal_phantom_has_no_labels_or_masks():
    ph = phantom(20, ())
    assert not any(ph.labels.values()) and ph.masks == {}
    assert ph.info["lesions"] == {} and ph.info["shift_mm"] == 0


def test_any_hemorrhage_is_the_union_of_the_types():
    ph = phantom(21, ("intraparenchymal", "subarachnoid", "fracture"))
    union = ph.masks["intraparenchymal"] | ph.masks["subarachnoid"]
    assert np.array_equal(ph.masks["any_hemorrhage"], union)
    assert ph.labels["any_hemorrhage"] == 1 and ph.labels["fracture"] == 1


def test_any_hemorrhage_alone_adds_a_type():
    ph = phantom(22, ("any_hemorrhage",))
    assert ph.labels["any_hemorrhage"] == 1
    assert sum(ph.labels[t] for t in HEMORRHAGE_TYPES) == 1


@pytest.mark.slow
def test_random_findings_cover_every_task_and_are_consistent():
    seen = dict.fromkeys(TASKS, 0)
    bleeding = 0
    for seed in range(30):
        ph = make_phantom(seed, in_plane_size=64, slices="thick")
        bleeding += ph.labels["any_hemorrhage"]
        assert ph.labels["any_hemorrhage"] == int(any(ph.labels[t] for t in HEMORRHAGE_TYPES))
        assert set(ph.masks) == {t for t, v in ph.labels.items() if v}
        assert all(m.any() for m in ph.masks.values())
        for t in TASKS:
            seen[t] += ph.labels[t]
    assert all(seen.values()), seen
    assert 8 <= bleeding <= 22


def test_unknown_finding_and_bad_arguments_are_refused():
    with pytest.raises(ConfigError, match="bleed"):
        make_phantom(0, findings=["bleed"])
    with pytest.raises(ConfigError, match="slices"):
        make_phantom(0, slices="medium")
    with pytest.raises(ConfigError, match="anatomy"):
        make_phantom(0, anatomy="martian")


# --------------------------------------------------------------------------------------------
# Hounsfield units
# --------------------------------------------------------------------------------------------

def test_skull_is_bone_background_is_air_and_padding():
    ph = phantom(30, ())
    a = ph.volume.array
    assert a.dtype == np.float32
    assert a.max() > 1000 and 0.01 < (a > 600).mean() < 0.2
    assert np.all(a[:, 0, 0] == ANATOMY_PRESETS["default"].background_hu)       # outside the scan circle
    edge = a[:, SIZE // 2, 2:8]                                                  # inside the circle, beside the head
    assert abs(float(np.median(edge)) + 1000) < 15
    brain = a[a.shape[0] // 2, SIZE // 2 - 5:SIZE // 2 + 5, SIZE // 2 - 20:SIZE // 2 - 10]
    assert 10 < float(np.median(brain)) < 50


def test_lesions_are_hyperdense_in_their_ranges():
    ph = phantom(31, ("intraparenchymal", "subdural", "epidural", "intraventricular", "subarachnoid"))
    a = ph.volume.array
    for task, (lo, hi) in {"intraparenchymal": (48, 92), "subdural": (45, 85), "epidural": (55, 95),
                           "intraventricular": (35, 85), "subarachnoid": (30, 75)}.items():
        median = float(np.median(a[ph.masks[task]]))
        assert lo < median < hi, (task, median)


def test_hematoma_brighter_than_the_brain_around_it():
    ph = make_phantom(32, findings=["intraparenchymal"], slices="thick", in_plane_size=SIZE, anatomy=QUIET)
    a, mask = ph.volume.array, ph.masks["intraparenchymal"]
    ring = _dilate(mask, 6) & ~_dilate(mask, 3) & (a > 10) & (a < 60)
    assert a[mask].mean() > a[ring].mean() + 15


def test_fracture_is_a_gap_in_the_bone():
    ph = make_phantom(33, findings=["fracture"], slices="thin", in_plane_size=SIZE, anatomy=QUIET)
    normal = make_phantom(33, findings=[], slices="thin", in_plane_size=SIZE, anatomy=QUIET)
    mask = ph.masks["fracture"]
    assert ph.volume.array[mask].mean() < normal.volume.array[mask].mean() - 150
    assert (normal.volume.array[mask] > 600).mean() > 0.2        # the mask sits on the skull


# --------------------------------------------------------------------------------------------
# Geometry
# --------------------------------------------------------------------------------------------

def test_thick_and_thin_slices():
    thick, thin = phantom(40, slices="thick"), phantom(40, slices="thin")
    assert thick.volume.spacing[2] in (4.0, 4.5, 5.0) and 28 <= thick.volume.array.shape[0] <= 50
    assert 0.5 <= thin.volume.spacing[2] <= 1.0 and 140 <= thin.volume.array.shape[0] <= 420
    for ph in (thick, thin):
        v = ph.volume
        assert v.array.shape[1:] == (SIZE, SIZE)
        assert v.spacing[:2] == pytest.approx((230.0 / SIZE,) * 2)
        assert np.allclose(v.direction, np.eye(3))
        assert v.origin[0] == pytest.approx(-115.0 + v.spacing[0] / 2)
        extent = v.spacing[2] * v.array.shape[0]
        assert 140 <= extent <= 210
        assert ph.info["slice_thickness_mm"] == v.spacing[2]


def test_lesion_centre_lies_in_its_mask():
    ph = phantom(41, ("intraparenchymal",))
    centre = np.asarray(ph.info["lesions"]["intraparenchymal"]["centre_mm"])
    ijk = np.round(np.linalg.solve(ph.volume.index_to_physical, [*centre, 1.0])[:3]).astype(int)
    assert ph.masks["intraparenchymal"][ijk[2], ijk[1], ijk[0]]


def test_mass_effect_shifts_midline_away_from_the_lesion():
    plain = make_phantom(50, findings=["subdural"], slices="thick", in_plane_size=SIZE, anatomy=QUIET)
    shifted = make_phantom(50, findings=["subdural", "midline_shift"], slices="thick", in_plane_size=SIZE, anatomy=QUIET)
    info = shifted.info
    assert info["shift_mm"] >= 5 and shifted.labels["midline_shift"] == shifted.labels["mass_effect"] == 1
    assert info["mass_effect_cause"] == "subdural"
    side = info["lesions"]["subdural"]["side"]                # +1 = patient left = +x
    assert info["shift_direction"] == ("right" if side > 0 else "left")
    dx = _ventricle_centroid_x(shifted) - _ventricle_centroid_x(plain)
    assert -side * dx > 0.5 * info["shift_mm"], (dx, info["shift_mm"])
    mask = shifted.masks["mass_effect"]
    assert np.array_equal(mask, shifted.masks["midline_shift"])
    assert (mask & ~shifted.masks["subdural"]).sum() > 50       # displaced midline structures, not just the lesion
    assert plain.labels["mass_effect"] == 0 and "mass_effect" not in plain.masks


def _ventricle_centroid_x(ph) -> float:
    """x (mm) of the CSF near the head centre: the ventricles."""
    a, v = ph.volume.array, ph.volume
    centre = np.asarray(ph.info["head_centre_mm"])
    k, j, i = np.nonzero((a > -20) & (a < 15))
    xyz = (v.index_to_physical @ np.stack([i, j, k, np.ones_like(i)]))[:3].T
    near = np.all(np.abs(xyz - centre) < [35.0, 45.0, 30.0], axis=1)
    return float(xyz[near, 0].mean())


def test_mass_effect_without_a_cause_adds_one():
    ph = phantom(51, ("mass_effect",))
    cause = ph.info["mass_effect_cause"]
    assert cause in ("intraparenchymal", "subdural", "epidural") and ph.labels[cause] == 1
    assert 2 <= ph.info["shift_mm"] <= 12
    assert ph.labels["midline_shift"] == int(ph.info["shift_mm"] >= 5)
    assert np.all(ph.masks["mass_effect"][ph.masks[cause]])


def test_ood_preset_is_measurably_different():
    def csf_ml(anatomy, seed):
        ph = make_phantom(seed, findings=[], slices="thick", in_plane_size=96, anatomy=anatomy)
        a = ph.volume.array
        return ((a > -20) & (a < 15)).sum() * np.prod(ph.volume.spacing) / 1000

    def air_noise(anatomy, seed):
        ph = phantom(seed, (), anatomy=anatomy)
        a = ph.volume.array
        return float(a[:, SIZE // 2, 2:6].std())

    quiet_ood = replace(ANATOMY_PRESETS["ood"], noise_hu=(0.0, 0.0))
    assert np.mean([csf_ml(quiet_ood, s) for s in (60, 61)]) > 1.5 * np.mean([csf_ml(QUIET, s) for s in (60, 61)])
    assert np.mean([air_noise("ood", s) for s in (62, 63)]) > 1.3 * np.mean([air_noise("default", s) for s in (62, 63)])
    assert phantom(62, (), anatomy="ood").volume.array.min() == ANATOMY_PRESETS["ood"].background_hu
    assert phantom(62, (), anatomy="ood").info["anatomy"] == "ood"


def test_info_is_json():
    ph = phantom(70, ("epidural", "fracture", "mass_effect"))
    info = json.loads(json.dumps(ph.info))
    assert info["seed"] == 70 and info["anatomy"] == "default"
    assert set(info["lesions"]) == {"epidural", "fracture"}
    assert info["spacing_mm"] == list(ph.volume.spacing)


# --------------------------------------------------------------------------------------------
# A dataset on disk
# --------------------------------------------------------------------------------------------

def test_write_phantom_set_nifti(tmp_path):
    calls = []
    out = write_phantom_set(tmp_path / "set", 3, seed=5, slices="thick", in_plane_size=64,
                            progress=lambda f, msg: calls.append(f))
    with open(out / "labels.csv", newline="") as fh:
        reader = csv.DictReader(fh)
        rows = list(reader)
    assert reader.fieldnames == ["case_id", "path", *TASKS, "slice_thickness_mm", "anatomy"]
    assert len(rows) == 3 and len({r["case_id"] for r in rows}) == 3
    assert calls[-1] == pytest.approx(1.0) and len(calls) == 3
    seeds = set()
    for row in rows:
        ct = sitk.ReadImage(str(out / row["path"]))
        assert ct.GetSize()[:2] == (64, 64) and row["anatomy"] == "default"
        assert float(row["slice_thickness_mm"]) == pytest.approx(ct.GetSpacing()[2])
        info = json.loads((out / row["case_id"] / "info.json").read_text())
        seeds.add(info["seed"])
        for task in TASKS:
            mask_file = out / row["case_id"] / f"mask_{task}.nii.gz"
            assert mask_file.exists() == (row[task] == "1"), (row["case_id"], task)
            if mask_file.exists():
                mask = sitk.ReadImage(str(mask_file))
                assert mask.GetPixelID() == sitk.sitkUInt8 and mask.GetSize() == ct.GetSize()
                assert mask.GetOrigin() == pytest.approx(ct.GetOrigin())
                assert sitk.GetArrayViewFromImage(mask).max() == 1
    assert len(seeds) == 3


# --------------------------------------------------------------------------------------------
# Realism (issue #12 item 3): tissues, skull, dura, artifacts, and where each lesion lies
# --------------------------------------------------------------------------------------------
# FLAT: noise-free, head not turned, no head rest: head-local axes are the scanner's LPS axes
# (x = left, y = posterior, z = superior) about info["head_centre_mm"], so landmarks can be sampled.
FLAT = replace(ANATOMY_PRESETS["default"], noise_hu=(0.0, 0.0), rotation_deg=((0.0, 0.0),) * 3, headrest_prob=0.0)


@lru_cache(maxsize=None)
def flat(seed: int, findings: tuple[str, ...] = (), slices: str = "thick", size: int = 96, **changes):
    return make_phantom(seed, findings=list(findings), slices=slices, in_plane_size=size,
                        anatomy=replace(FLAT, **changes) if changes else FLAT)


def local_mm(ph, mask: np.ndarray) -> np.ndarray:
    """Head-local coordinates (mm) of the voxels of mask, for FLAT phantoms."""
    k, j, i = np.nonzero(mask)
    xyz = (ph.volume.index_to_physical @ np.stack([i, j, k, np.ones_like(i)]))[:3].T
    return xyz - np.asarray(ph.info["head_centre_mm"])


def local_box(ph, lo, hi) -> np.ndarray:
    """Mask of the voxels whose head-local centre lies in the box [lo, hi] (mm), for FLAT phantoms."""
    v = ph.volume
    shape = v.array.shape
    grids = np.meshgrid(*(np.arange(n) for n in shape[::-1]), indexing="ij")       # i, j, k
    xyz = np.einsum("ab,b...->a...", v.index_to_physical[:3, :3], np.stack(grids)) + v.index_to_physical[:3, 3, None, None, None]
    xyz = xyz - np.asarray(ph.info["head_centre_mm"])[:, None, None, None]
    inside = np.all([(xyz[a] >= lo[a]) & (xyz[a] <= hi[a]) for a in range(3)], axis=0)
    return inside.transpose(2, 1, 0)


@pytest.mark.slow
def test_tissue_hu_are_those_of_a_head_ct():
    """Grey ~35-40, white ~25-30, CSF ~5-10 (issue #12), drawn per phantom; and the image holds them."""
    for seed in range(12):
        for anatomy in ("default", "realistic"):
            hu = make_phantom(seed, findings=[], slices="thick", in_plane_size=32, anatomy=anatomy).info["tissue_hu"]
            gm = (34, 41) if anatomy == "realistic" else (37, 44)      # the shipped demo model knows 37-44
            assert gm[0] <= hu["gm"] <= gm[1] and 22 <= hu["wm"] <= 31 and 0 <= hu["csf"] <= 12, (anatomy, hu)
            assert 4 <= hu["gm"] - hu["wm"] <= 20 and hu["wm"] < hu["nuclei"] < hu["gm"]
            assert hu["bone"] > 1000 and hu["diploe"] < hu["bone"] and hu["fat"] < -60
    ph = flat(80, slices="thin", size=128)
    a, hu = ph.volume.array, ph.info["tissue_hu"]
    # deep white matter (centrum semiovale, above the ventricles) and the body of the lateral ventricle
    wm = a[local_box(ph, (16, -10, 30), (24, 0, 34))]
    vent = a[local_box(ph, (-11, -2, 14), (-9, 2, 17)) | local_box(ph, (9, -2, 14), (11, 2, 17))]
    assert wm.size and abs(float(np.median(wm)) - hu["wm"]) < 2.5, (np.median(wm), hu)
    assert vent.size and abs(float(np.median(vent)) - hu["csf"]) < 3.0, (np.median(vent), hu)
    brain = a[local_box(ph, (-45, -50, -10), (45, 50, 45))]
    brain = brain[(brain > 15) & (brain < 50)]
    # most of the brain is white matter at its HU; the cortex, thin against 1.8 mm voxels, is the bright tail
    assert (np.abs(brain - hu["wm"]) < 1.0).mean() > 0.3
    assert abs(float(np.percentile(brain, 97)) - hu["gm"]) < 2.0, (np.percentile(brain, [90, 97]), hu)


def test_sutures_are_thin_gaps_in_the_calvarium():
    on, off = flat(81, slices="thin", size=128), flat(81, slices="thin", size=128, sutures=False)
    assert on.info["sutures"] and not off.info["sutures"]
    d = on.volume.array - off.volume.array
    changed = np.abs(d) > 1
    assert changed.sum() > 100
    assert (off.volume.array[changed] > 300).mean() > 0.8             # only bone changes (and its partial-volume edge) ...
    assert (off.volume.array[d < -50] > 300).mean() > 0.97
    assert d.min() < -200 and (d[changed] < 0).all()                 # ... and becomes less dense
    xyz = local_mm(on, changed)
    assert np.percentile(xyz[:, 2], 5) > -35                          # the calvarium, not the skull base
    assert (xyz[:, 1] < 0).any() and (xyz[:, 1] > 0).any()            # coronal (front) and lambdoid (back)


def _edh_suture_sides(ph, seed, settings):
    from fmct.phantom.anatomy import _sample_anatomy, _suture_planes

    anat = _sample_anatomy(np.random.default_rng(np.random.SeedSequence(seed).spawn(6)[0]), settings)
    xyz = local_mm(ph, ph.masks["epidural"]).astype(np.float32)
    coronal, lambdoid = _suture_planes(anat, xyz[:, 0], xyz[:, 1], xyz[:, 2])
    centre = np.asarray(ph.info["lesions"]["epidural"]["centre_mm"]) - np.asarray(ph.info["head_centre_mm"])
    c0, l0 = (float(v) for v in _suture_planes(anat, *(np.float32(c) for c in centre)))
    return np.sign(c0) * coronal, np.sign(l0) * lambdoid


def test_epidural_stops_at_the_sutures():
    seed = 0
    ph = flat(seed, ("epidural",))
    unlimited = flat(seed, ("epidural",), edh_limited_by_sutures=False)
    coronal, lambdoid = _edh_suture_sides(ph, seed, FLAT)
    assert coronal.min() > -2.5 and lambdoid.min() > -2.5            # never across a suture (voxel tolerance)
    coronal, _ = _edh_suture_sides(unlimited, seed, replace(FLAT, edh_limited_by_sutures=False))
    assert coronal.min() < -10                                        # the same bleed would have crossed one
    assert ph.masks["epidural"].sum() > 0.5 * unlimited.masks["epidural"].sum()
    assert ph.info["lesions"]["epidural"]["bone"] in ("frontal", "parietal", "occipital")


def test_subdural_lies_on_the_inner_table_over_the_convexity():
    for seed in (1, 2):
        ph, normal = flat(seed, ("subdural",)), flat(seed, ())
        m = ph.masks["subdural"]
        bone_next_to = normal.volume.array[_dilate(m, 2) & ~m] > 300
        assert bone_next_to.sum() > 100                                 # it touches the skull
        xyz = local_mm(ph, m)
        r = np.linalg.norm(xyz / np.asarray(ph.info["head_semi_axes_mm"]), axis=1)
        assert np.median(r) > 0.7                                       # at the periphery, not deep
        assert (normal.volume.array[m] < 20).mean() < 0.1               # over brain, not in the ventricles


@pytest.mark.slow
def test_subdural_also_layers_along_the_falx_and_on_the_tentorium():
    where = {}
    for seed in range(8):
        ph = flat(seed, ("subdural",), slices="thin", size=128, dural_subdural_prob=1.0, tentorium=True)
        normal = flat(seed, (), slices="thin", size=128, dural_subdural_prob=1.0, tentorium=True)
        info, m = ph.info["lesions"]["subdural"], ph.masks["subdural"]
        where.setdefault(info["where"], []).append(seed)
        xyz = local_mm(ph, m)
        x_side = xyz[:, 0] * info["side"]                              # > 0: the lesion's side of the midline
        assert m.sum() > 100 and np.median(ph.volume.array[m]) >= 45   # acute blood, partial volume included
        assert np.median(ph.volume.array[m].astype(float) - normal.volume.array[m]) > 5
        if info["where"] == "falx":                                    # a thin sheet beside the midline, high up
            assert (x_side > 0).all() and (x_side < 8).all() and np.median(xyz[:, 2]) > 20
        else:                                                          # on one tentorial leaf, over the posterior fossa
            assert info["where"] == "tentorium" and (x_side > 0).mean() > 0.99 and np.median(x_side) > 10
            assert (xyz[:, 1] > 5).all() and (xyz[:, 2] < 5).all() and (xyz[:, 2] > -70).all()
    assert set(where) == {"falx", "tentorium"}
    default = [flat(s, ("subdural",)).info["lesions"]["subdural"]["where"] for s in (1, 2, 3)]
    assert default == ["convexity"] * 3 and ANATOMY_PRESETS["default"].dural_subdural_prob == 0
    assert ANATOMY_PRESETS["realistic"].dural_subdural_prob > 0


@pytest.mark.slow
def test_intraventricular_blood_layers_dependently_inside_the_ventricles():
    seeds = [s for s in range(2, 12) if flat(s, ("intraventricular",)).info["lesions"]["intraventricular"]["mode"] == "layering"][:2]
    assert seeds
    for seed in seeds:
        ph, normal = flat(seed, ("intraventricular",)), flat(seed, ())
        m = ph.masks["intraventricular"]
        assert (normal.volume.array[m] < 20).mean() > 0.5               # where the normal head has CSF
        csf = (normal.volume.array > -20) & (normal.volume.array < 15) & local_box(normal, (-35, -45, -20), (35, 45, 30))
        y_blood, y_csf = local_mm(ph, m)[:, 1].mean(), local_mm(normal, csf)[:, 1].mean()
        assert y_blood > y_csf + 10 and y_blood > 15, (y_blood, y_csf)  # supine: posterior, the occipital horns


def test_subarachnoid_blood_fills_csf_spaces():
    """Basal SAH fills the cisterns and fissures (CSF in the normal head); convexity SAH lies under the inner table."""
    for seed in (2, 1):                                   # basal, convexity
        ph, normal = flat(seed, ("subarachnoid",), slices="thin", size=128), flat(seed, (), slices="thin", size=128)
        m = ph.masks["subarachnoid"]
        assert np.median(ph.volume.array[m]) > np.median(normal.volume.array[m]) + 15
        if ph.info["lesions"]["subarachnoid"]["where"] == "basal":
            ring = _dilate(m, 3) & ~_dilate(m, 1) & (normal.volume.array > 15) & (normal.volume.array < 60)
            # where the blood is, the normal head had CSF: darker than the brain around it
            assert np.median(normal.volume.array[m]) < normal.volume.array[ring].mean() - 5
            assert np.median(local_mm(ph, m)[:, 2]) < -5                 # at the skull base
        else:
            r = np.linalg.norm(local_mm(ph, m) / np.asarray(ph.info["head_semi_axes_mm"]), axis=1)
            assert np.median(r) > 0.7


def test_intraparenchymal_hematoma_has_a_hypodense_oedema_rim():
    ph, normal = flat(32, ("intraparenchymal",)), flat(32, ())
    m = ph.masks["intraparenchymal"]
    rim = _dilate(m, 2) & ~_dilate(m, 1) & (normal.volume.array > 15) & (normal.volume.array < 60)
    assert (ph.volume.array[rim] - normal.volume.array[rim]).mean() < -2      # oedema: darker than that brain was
    assert ph.volume.array[m].mean() > normal.volume.array[m].mean() + 20


@pytest.mark.parametrize("finding", ["subdural", "epidural", "intraparenchymal", "subarachnoid", "intraventricular"])
def test_masks_cover_the_hyperdensity(finding):
    """The lesion mask is where the image got brighter: every brightened voxel is in (or next to) it."""
    ph, normal = flat(3, (finding,)), flat(3, ())
    d, m = ph.volume.array - normal.volume.array, ph.masks[finding]
    hot = d > 10
    assert hot.sum() > 20
    assert _dilate(m, 1)[hot].mean() > 0.98
    assert (d[m] > 5).mean() > 0.35


@pytest.mark.slow
def test_fracture_goes_through_the_whole_thickness_of_the_skull():
    ph, normal = flat(33, ("fracture",), slices="thin", size=256), flat(33, (), slices="thin", size=256)
    info = ph.info["lesions"]["fracture"]
    centre = np.asarray(info["centre_mm"]) - np.asarray(ph.info["head_centre_mm"])
    u = centre / np.linalg.norm(centre)
    v = ph.volume
    # a ray from the brain centre out through the fracture: bone on it without, none with the fracture
    ts = np.linalg.norm(centre) + np.arange(-15.0, 15.0, 0.25)
    pts = np.asarray(ph.info["head_centre_mm"]) + ts[:, None] * u
    ijk = np.round(np.linalg.solve(v.index_to_physical, np.c_[pts, np.ones(len(pts))].T)[:3]).astype(int)
    before, after = normal.volume.array[ijk[2], ijk[1], ijk[0]], ph.volume.array[ijk[2], ijk[1], ijk[0]]
    assert before.max() > 900
    assert after.max() < 0.5 * before.max(), (after.max(), before.max())


def test_mastoid_air_cells_tentorium_and_beam_hardening():
    base = flat(84, slices="thin", size=128, mastoid_prob=0.0, tentorium=False)
    mastoid = flat(84, slices="thin", size=128, mastoid_prob=1.0, tentorium=False)
    air = (mastoid.volume.array < -400) & (base.volume.array > -100)
    xyz = local_mm(mastoid, air)
    assert mastoid.info["mastoid_air_cells"] and len(xyz) > 10
    assert (np.abs(xyz[:, 0]) > 30).all() and (xyz[:, 1] > 10).all() and (xyz[:, 2] < -35).all()   # behind the ears, low
    tent = flat(84, slices="thin", size=128, mastoid_prob=0.0, tentorium=True)
    d = tent.volume.array - base.volume.array
    xyz = local_mm(tent, np.abs(d) > 3)
    assert len(xyz) > 50 and (d[np.abs(d) > 3] > 0).mean() > 0.85                                   # a dense sheet ...
    assert (base.volume.array[d > 3] < 60).mean() > 0.9                                            # ... in brain and CSF
    assert (xyz[:, 1] > -10).all() and (xyz[:, 2] < 5).all() and (xyz[:, 2] > -70).all()           # over the posterior fossa
    bh = flat(84, slices="thin", size=128, mastoid_prob=0.0, tentorium=True, beam_hardening_prob=1.0)
    d = bh.volume.array - tent.volume.array
    assert bh.info["beam_hardening"]["depth_hu"] > 0 and "beam_hardening" not in tent.info
    changed = np.abs(d) > 1
    assert changed.any() and d[changed].mean() < 0                                                  # mostly darker
    assert (np.abs(tent.volume.array[changed]) <= 300).all()                                        # soft tissue only
    xyz = local_mm(bh, changed)
    assert np.percentile(xyz[:, 2], 95) < -15                                                       # at the skull base


def test_realistic_preset_is_reproducible_and_wider():
    a = make_phantom(90, slices="thick", in_plane_size=64, anatomy="realistic")
    b = make_phantom(90, slices="thick", in_plane_size=64, anatomy="realistic")
    assert np.array_equal(a.volume.array, b.volume.array) and a.info == b.info
    r, d = ANATOMY_PRESETS["realistic"], ANATOMY_PRESETS["default"]
    for name in ("white_matter_hu", "csf_hu", "noise_hu", "kernel_fwhm_mm"):
        lo, hi = getattr(r, name)
        assert lo <= getattr(d, name)[0] and hi >= getattr(d, name)[1] and hi - lo > getattr(d, name)[1] - getattr(d, name)[0]
    assert r.beam_hardening_prob > 0 and r.tentorium
