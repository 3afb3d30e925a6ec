"""Synthetic head CTs with findings and lesion masks, deterministic by seed.

Phantoms train and test the detector (labels), test that saliency falls inside lesions (masks),
and exercise readers, preprocessing and the Slicer modules without patient data. So they must be
plausible in a brain window, varied, exactly reproducible from a seed, and fast enough to make
thousands.

How it is built, and why:
- Anatomy lives in a head-local frame (mm, origin at the brain centre, x = patient left,
  y = posterior, z = superior). Every structure is a signed-distance-like field, drawn with a soft
  edge one voxel wide, so thin things (sulci, falx, a fracture gap) keep their partial volume
  instead of aliasing away.
- Fields are rasterised on an isotropic grid in that frame (0.75 to 1.6 mm depending on the
  output pixel), in z-chunks that stay in cache, each structure only inside its bounding box;
  the gyral pattern is tabulated over directions and interpolated from a coarse grid.
- The head is then placed in the scanner (tilt and offset) by resampling that grid once
  (SimpleITK, C++); thick slices average several sub-slices (partial volume), masks take the
  union over them. Correlated noise, the reconstruction circle and a head rest come last.
- Random draws come from separate child generators for anatomy, findings, lesions and scan, so
  the same seed with other findings gives the same head (the mass-effect test relies on this).
"""
from __future__ import annotations

import csv
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import SimpleITK as sitk

from fmct.errors import Cancelled, ConfigError
from fmct.volume import Volume

TASKS: tuple[str, ...] = (
    "any_hemorrhage", "intraparenchymal", "intraventricular", "subarachnoid", "subdural", "epidural",
    "fracture", "mass_effect", "midline_shift",
)
HEMORRHAGE_TYPES: tuple[str, ...] = ("intraparenchymal", "intraventricular", "subarachnoid", "subdural", "epidural")
_LESION_BIT = {"intraparenchymal": 1, "intraventricular": 2, "subarachnoid": 4, "subdural": 8, "epidural": 16, "fracture": 32}
_MIDLINE_BIT = 64
_MASS_CAUSES = ("intraparenchymal", "subdural", "epidural")
_THICK_MM = (4.0, 4.5, 5.0)
_THIN_MM = (0.5, 0.625, 0.75, 1.0)
_CHUNK_VOXELS = 300_000     # per render chunk: temporaries stay in cache, per-chunk overheads stay small
_AIR = -1000.0

Range = tuple[float, float]


# ============================================================================================
# Settings: what varies between phantoms, per population
# ============================================================================================

@dataclass(frozen=True)
class AnatomySettings:
    """Ranges each phantom draws its anatomy and scanner from; a preset is one population."""

    head_semi_axes_mm: tuple[Range, Range, Range] = ((68.0, 80.0), (86.0, 100.0), (80.0, 92.0))  # LR, AP, SI (above centre)
    scalp_thickness_mm: Range = (4.0, 7.0)
    skull_thickness_mm: Range = (5.0, 8.0)
    atrophy: Range = (0.0, 0.35)            # 0 young .. 1 very atrophic: sulcal, cisternal and ventricular CSF
    ventricle_scale: Range = (0.85, 1.15)
    grey_matter_hu: Range = (37.0, 44.0)
    white_matter_hu: Range = (24.0, 30.0)
    csf_hu: Range = (2.0, 10.0)
    bone_hu: Range = (1200.0, 1800.0)
    noise_hu: Range = (2.5, 6.0)            # at 5 mm slices; thinner slices get sqrt(5/t) more, at most 25
    kernel_fwhm_mm: Range = (0.8, 1.4)      # in-plane resolution of the reconstruction kernel
    rotation_deg: tuple[Range, Range, Range] = ((-8.0, 8.0), (-5.0, 15.0), (-6.0, 6.0))  # yaw, pitch (+ chin down), roll
    offset_mm: tuple[Range, Range, Range] = ((-10.0, 10.0), (-5.0, 20.0), (-40.0, 40.0))  # head centre in scanner LPS
    scan_below_centre_mm: Range = (55.0, 72.0)  # where the scan starts, below the brain centre
    calcification_prob: float = 0.6        # choroid plexus / pineal calcifications (hyperdense mimics)
    frontal_sinus_prob: float = 0.8
    headrest_prob: float = 0.8
    background_hu: float = -1024.0          # outside the reconstruction circle


ANATOMY_PRESETS: dict[str, AnatomySettings] = {
    "default": AnatomySettings(),
    # Older, atrophic, broad heads on a sharper, noisier scanner that pads with -3024: an
    # out-of-distribution population for robustness tests.
    "ood": AnatomySettings(
        head_semi_axes_mm=((76.0, 86.0), (84.0, 94.0), (84.0, 96.0)),
        skull_thickness_mm=(6.5, 10.0),
        atrophy=(0.55, 1.0),
        ventricle_scale=(1.3, 1.8),
        grey_matter_hu=(33.0, 37.0),
        white_matter_hu=(28.0, 31.0),
        noise_hu=(9.0, 14.0),
        kernel_fwhm_mm=(0.5, 0.8),
        rotation_deg=((-15.0, 15.0), (-12.0, 25.0), (-12.0, 12.0)),
        scan_below_centre_mm=(62.0, 80.0),
        calcification_prob=0.9,
        headrest_prob=0.3,
        background_hu=-3024.0,
    ),
}


@dataclass
class Phantom:
    """A synthetic CT, its ground truth, and how it was made.

    masks: one bool array on volume.array's grid for every positive task.
    labels: 0/1 for every name in TASKS.
    info: JSON-serialisable parameters (seed, geometry, lesion centres in scanner LPS mm, ...).
    """

    volume: Volume
    masks: dict[str, np.ndarray]
    labels: dict[str, int]
    info: dict


# ============================================================================================
# Public entry points
# ============================================================================================

def make_phantom(
    seed: int,
    *,
    findings: Sequence[str] | None = None,
    slices: str = "random",
    in_plane_size: int = 512,
    fov_mm: float = 230.0,
    anatomy: str | AnatomySettings = "default",
) -> Phantom:
    """One synthetic head CT with its masks and labels; the same arguments give the same voxels.

    findings: None draws them at random (about half the phantoms bleed); otherwise exactly these,
    plus what they imply: "mass_effect" adds a large intraparenchymal, subdural or epidural
    hematoma to cause it (one of those requested, if any); "midline_shift" means mass effect with a
    shift of at least 5 mm; "any_hemorrhage" alone adds one hemorrhage type at random.
    """
    settings, anatomy_name = _resolve_anatomy(anatomy)
    _check_arguments(slices, in_plane_size, fov_mm)
    rng_anat, rng_find, rng_lesion, rng_scan, rng_noise = (
        np.random.default_rng(s) for s in np.random.SeedSequence(int(seed)).spawn(5))
    anat = _sample_anatomy(rng_anat, settings)
    plan = _plan_findings(rng_find, findings)
    scan = _sample_scan(rng_scan, settings, anat, slices, in_plane_size, fov_mm)
    scene = _Scene(anat, scan.rotation, plan, rng_lesion)
    grid = _render_grid(anat, scan)
    hu, bits = _render(scene, grid)
    array, out_bits = _place_in_scanner(hu, bits, grid, scan, anat)
    _add_headrest(array, scan)
    _add_noise_and_circle(array, scan, rng_noise)
    volume = Volume(array, scan.spacing, scan.origin, np.eye(3), {"series_description": "FMCT phantom"})
    masks, labels = _masks_and_labels(out_bits, scene)
    info = _info(seed, anatomy_name, anat, scan, scene, labels)
    return Phantom(volume, masks, labels, info)


def write_phantom_set(
    out_dir: str | Path,
    n: int,
    seed: int,
    *,
    fmt: str = "nifti",
    slices: str = "random",
    in_plane_size: int = 512,
    anatomy: str | AnatomySettings = "default",
    progress: Callable[[float, str], None] | None = None,
    cancel: Callable[[], bool] | None = None,
) -> Path:
    """A folder of phantoms as a dataset: one case folder each, masks, and labels.csv.

    Each case gets <case_id>/ct.nii.gz (or a DICOM series in <case_id>/ct/), mask_<task>.nii.gz
    for every positive task (uint8, same grid) and info.json; labels.csv lists case_id, path
    (relative to out_dir), one 0/1 column per task, slice_thickness_mm and anatomy. Case seeds
    are derived from `seed`, so the set is reproducible and cases differ.
    """
    if fmt not in ("nifti", "dicom"):
        raise ConfigError(f"Unknown phantom format {fmt!r}: use 'nifti' or 'dicom'.")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(int(n)):
        if cancel is not None and cancel():
            raise Cancelled("Writing phantoms was cancelled.")
        case_id = f"phantom_{i:05d}"
        case_seed = int(np.random.SeedSequence([int(seed), i]).generate_state(1)[0])
        ph = make_phantom(case_seed, slices=slices, in_plane_size=in_plane_size, anatomy=anatomy)
        rel = _write_case(out / case_id, case_id, ph, fmt, case_seed)
        rows.append({"case_id": case_id, "path": f"{case_id}/{rel}", **ph.labels,
                     "slice_thickness_mm": ph.info["slice_thickness_mm"], "anatomy": ph.info["anatomy"]})
        if progress is not None:
            progress((i + 1) / n, f"phantom {i + 1}/{n}")
    _write_labels_csv(out / "labels.csv", rows)
    return out


# ============================================================================================
# Arguments
# ============================================================================================

def _resolve_anatomy(anatomy: str | AnatomySettings) -> tuple[AnatomySettings, str]:
    if isinstance(anatomy, AnatomySettings):
        return anatomy, "custom"
    if anatomy not in ANATOMY_PRESETS:
        raise ConfigError(f"Unknown anatomy preset {anatomy!r}: use one of {', '.join(ANATOMY_PRESETS)} "
                          "or pass an AnatomySettings.")
    return ANATOMY_PRESETS[anatomy], anatomy


def _check_arguments(slices: str, in_plane_size: int, fov_mm: float) -> None:
    if slices not in ("thick", "thin", "random"):
        raise ConfigError(f"slices must be 'thick', 'thin' or 'random', got {slices!r}.")
    if not 32 <= int(in_plane_size) <= 2048:
        raise ConfigError(f"in_plane_size must be between 32 and 2048 pixels, got {in_plane_size}.")
    if not 200.0 <= float(fov_mm) <= 500.0:
        raise ConfigError(f"fov_mm must be between 200 and 500 mm so the head fits, got {fov_mm}.")


def _u(rng: np.random.Generator, r: Range) -> float:
    return float(rng.uniform(r[0], r[1]))


def _unit(v) -> np.ndarray:
    v = np.asarray(v, dtype=np.float64)
    return v / np.linalg.norm(v)


def _f3(v) -> tuple[float, float, float]:
    """Python floats, so float32 arithmetic is never promoted to float64 (NEP 50)."""
    return tuple(float(x) for x in v)


# ============================================================================================
# Anatomy: one sampled head
# ============================================================================================

@dataclass
class _Anatomy:
    a: float            # head semi-axes (outer skin), mm
    b: float
    c: float
    c_down: float       # below the centre the head goes on into face and neck
    egg: float          # wider at the back than the front
    asym: float         # plagiocephaly
    fat_t: float
    skin_t: float
    scalp_t: float
    temporalis: float
    skull_t: float
    base_t: float
    csf_t: float        # extra-axial CSF over the convexity
    sulc_w: float
    sulc_depth: float
    gm_t: float
    ihf_w: float
    vent_scale: float
    atrophy: float
    sc: tuple[float, float, float]     # this head vs the reference head the landmarks are given for
    hu: dict[str, float]
    frontal_sinus: float               # extra frontal bone depth holding the sinus (0: none)
    calc_choroid: float                # HU of choroid plexus calcification (0: none)
    calc_pineal: float
    sulc_kappa: float
    sylvian_phase: tuple[float, float]
    sulc_waves: tuple[list, list, list]     # directions, wavelength scales, phases of the gyral pattern
    depth_waves: tuple[list, list, list]    # same, at a lower frequency, for how deep each sulcus goes
    kernel_fwhm: float
    noise5: float
    rotation: tuple[float, float, float]
    offset: tuple[float, float, float]
    below: float
    headrest: bool
    background: float


def _sample_anatomy(rng: np.random.Generator, s: AnatomySettings) -> _Anatomy:
    a, b, c = (_u(rng, r) for r in s.head_semi_axes_mm)
    atrophy = _u(rng, s.atrophy)
    gm, wm = _u(rng, s.grey_matter_hu), _u(rng, s.white_matter_hu)
    bone = _u(rng, s.bone_hu)
    hu = {
        "fat": _u(rng, (-110, -70)), "muscle": _u(rng, (35, 55)), "bone": bone,
        "diploe": bone * _u(rng, (0.3, 0.55)), "csf": _u(rng, s.csf_hu), "gm": gm, "wm": wm,
        "nuclei": wm + (gm - wm) * _u(rng, (0.55, 0.85)), "stem": wm + _u(rng, (1, 5)), "falx": _u(rng, (45, 75)),
        "globe": _u(rng, (5, 20)), "lens": _u(rng, (90, 130)), "sinus": _u(rng, (-980, -850)),
    }
    return _Anatomy(
        a=a, b=b, c=c, c_down=c * _u(rng, (1.5, 1.8)), egg=_u(rng, (0.0, 0.09)), asym=_u(rng, (-0.04, 0.04)),
        fat_t=_u(rng, (1.0, 3.0)), skin_t=_u(rng, (1.0, 2.0)), scalp_t=_u(rng, s.scalp_thickness_mm),
        temporalis=_u(rng, (4.0, 9.0)), skull_t=_u(rng, s.skull_thickness_mm), base_t=_u(rng, (2.5, 4.5)),
        csf_t=0.4 + 2.6 * atrophy + _u(rng, (0.0, 0.6)),
        sulc_w=0.7 + 2.5 * atrophy + _u(rng, (0.0, 0.6)),
        sulc_depth=_u(rng, (10.0, 15.0)) + 8.0 * atrophy,
        gm_t=_u(rng, (2.3, 3.5)), ihf_w=1.0 + 3.0 * atrophy + _u(rng, (0.0, 0.8)),
        vent_scale=_u(rng, s.ventricle_scale) * (1.0 + 0.3 * atrophy), atrophy=atrophy,
        sc=(a / 74.0, b / 93.0, c / 86.0), hu=hu,
        frontal_sinus=_u(rng, (6.0, 14.0)) if rng.random() < s.frontal_sinus_prob else 0.0,
        calc_choroid=_u(rng, (120, 400)) if rng.random() < s.calcification_prob else 0.0,
        calc_pineal=_u(rng, (100, 300)) if rng.random() < s.calcification_prob else 0.0,
        sulc_kappa=2 * math.pi / _u(rng, (15.0, 21.0)), sulc_waves=_waves(rng, 48), depth_waves=_waves(rng, 24),
        sylvian_phase=(_u(rng, (0, 2 * math.pi)), _u(rng, (0, 2 * math.pi))),
        kernel_fwhm=_u(rng, s.kernel_fwhm_mm), noise5=_u(rng, s.noise_hu),
        rotation=tuple(_u(rng, r) for r in s.rotation_deg), offset=tuple(_u(rng, r) for r in s.offset_mm),
        below=_u(rng, s.scan_below_centre_mm), headrest=bool(rng.random() < s.headrest_prob),
        background=float(s.background_hu),
    )


def _waves(rng: np.random.Generator, n: int) -> tuple[list, list, list]:
    """Directions, wavelength scales and phases of n plane waves: a random field over directions."""
    return ([_f3(_unit(rng.normal(size=3))) for _ in range(n)], [_u(rng, (0.75, 1.25)) for _ in range(n)],
            [_u(rng, (0, 2 * math.pi)) for _ in range(n)])


def _ref(anat: _Anatomy, p) -> tuple[float, float, float]:
    """A landmark given for the reference head (74 x 93 x 86 mm semi-axes), scaled to this one."""
    return _f3(np.asarray(p, dtype=np.float64) * anat.sc)


def _z_floor(anat: _Anatomy, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Height of the skull base under (x, y): anterior, middle and posterior fossae, foramen magnum.

    Three bowls, stepping down behind the sphenoid ridge and again behind the petrous ridges (which
    run postero-laterally), with the orbital roofs domed and the sella raised in the middle; this
    gives the lower slices their orbits, temporal lobes and posterior fossa.
    """
    sx, sy, sz = anat.sc
    xr, yr = x * (1.0 / sx), y * (1.0 / sy)
    ax = np.abs(xr)
    ant = -28.0 + 4.0 * np.exp(-((ax - 28.0) * (1.0 / 14.0)) ** 2) - 5.0 * np.exp(-(xr * (1.0 / 7.0)) ** 2)
    mid = -47.0 + 12.0 * np.exp(-(xr * (1.0 / 13.0)) ** 2)
    post = -62.0 + 0.004 * (xr * xr + (yr - 45.0) ** 2)
    z = ant + (mid - ant) * _sigmoid((yr + 22.0 + 0.15 * ax) * 0.2)
    z += (post - mid) * _sigmoid((yr + 2.0 - 0.55 * ax) * 0.2)
    r_fm = np.sqrt(xr * xr + (yr - 28.0) ** 2)
    return (z - 150.0 * _sigmoid((14.0 - r_fm) * (1.0 / 1.5))) * sz


def _sigmoid(t: np.ndarray) -> np.ndarray:
    return 0.5 + 0.5 * np.tanh(t)


def _z_callosum(anat: _Anatomy, y: np.ndarray) -> np.ndarray:
    """Lower edge of the interhemispheric fissure: the corpus callosum, and deep in front and behind it."""
    sy, sz = anat.sc[1], anat.sc[2]
    yr = y / sy
    return np.where(np.abs(yr) < 36.0, (26.0 - 8.0 * (yr / 33.0) ** 2) * sz, -25.0 * sz).astype(np.float32)


# ============================================================================================
# Findings: which, where, how big
# ============================================================================================

@dataclass
class _Plan:
    findings: set[str]
    shift_mm: float = 0.0
    cause: str | None = None


def _plan_findings(rng: np.random.Generator, findings: Sequence[str] | None) -> _Plan:
    if findings is None:
        return _random_plan(rng)
    requested = set(findings)
    unknown = requested - set(TASKS)
    if unknown:
        raise ConfigError(f"Unknown finding(s) {', '.join(sorted(unknown))}: use names from {', '.join(TASKS)}.")
    types = requested & set(HEMORRHAGE_TYPES)
    if "any_hemorrhage" in requested and not types:
        types.add(str(rng.choice(HEMORRHAGE_TYPES)))
    wants_shift = "midline_shift" in requested
    plan = _Plan(findings=types | (requested & {"fracture"}))
    if "mass_effect" in requested or wants_shift:
        _add_mass_effect(rng, plan, at_least_5mm=wants_shift)
    return plan


def _random_plan(rng: np.random.Generator) -> _Plan:
    """About half bleed; types co-occur as in trauma; fractures go with epidurals; big bleeds shift."""
    plan = _Plan(findings=set())
    if rng.random() < 0.5:
        first = str(rng.choice(HEMORRHAGE_TYPES))
        plan.findings = {first} | {t for t in HEMORRHAGE_TYPES if t != first and rng.random() < 0.3}
    p_fracture = 0.7 if "epidural" in plan.findings else 0.25
    if rng.random() < p_fracture:
        plan.findings.add("fracture")
    if plan.findings & set(_MASS_CAUSES) and rng.random() < 0.6:
        _add_mass_effect(rng, plan, at_least_5mm=False)
    return plan


def _add_mass_effect(rng: np.random.Generator, plan: _Plan, at_least_5mm: bool) -> None:
    candidates = sorted(plan.findings & set(_MASS_CAUSES)) or list(_MASS_CAUSES)
    plan.cause = str(rng.choice(candidates))
    plan.findings |= {plan.cause, "mass_effect"}
    plan.shift_mm = _u(rng, (5.5, 12.0) if at_least_5mm else (2.0, 12.0))


# ============================================================================================
# Scan geometry
# ============================================================================================

@dataclass
class _Scan:
    thickness: float
    pixel: float
    size: int
    fov: float
    n_slices: int
    spacing: tuple[float, float, float]
    origin: tuple[float, float, float]
    rotation: np.ndarray        # head-local axes -> scanner LPS
    centre: np.ndarray          # brain centre in scanner LPS
    sub_slices: int             # sub-slices averaged per slice (partial volume)
    noise_hu: float
    kernel_fwhm: float
    background: float
    headrest: dict | None


def _sample_scan(rng: np.random.Generator, s: AnatomySettings, anat: _Anatomy, slices: str,
                 size: int, fov: float) -> _Scan:
    kind = slices if slices != "random" else ("thick" if rng.random() < 0.5 else "thin")
    thickness = float(rng.choice(_THICK_MM if kind == "thick" else _THIN_MM))
    rot = _rotation(*anat.rotation)
    centre = _fit_in_fov(anat, rot, np.asarray(anat.offset, dtype=np.float64), fov)
    semi = np.array([anat.a * (1 + anat.egg), anat.b, anat.c])
    top = centre[2] + math.sqrt(float(np.sum((rot[2] * semi) ** 2))) + _u(rng, (3.0, 10.0))
    bottom = centre[2] - anat.below
    n_slices = int(math.ceil((top - bottom) / thickness))
    pixel = fov / size
    origin = (-fov / 2 + pixel / 2, -fov / 2 + pixel / 2, bottom + thickness / 2)
    sub = max(1, int(math.ceil(thickness / 1.7))) if thickness > 1.5 else 1
    noise = min(25.0, anat.noise5 * math.sqrt(5.0 / thickness))
    headrest = _sample_headrest(rng, anat, rot, centre) if anat.headrest else None
    return _Scan(thickness, pixel, size, fov, n_slices, (pixel, pixel, thickness), origin, rot, centre, sub,
                 noise, anat.kernel_fwhm, anat.background, headrest)


def _fit_in_fov(anat: _Anatomy, rot: np.ndarray, centre: np.ndarray, fov: float) -> np.ndarray:
    """Pull the head towards the isocentre until its skin is inside the reconstruction circle
    (technologists centre the head; a clipped skull would be a different, rarer problem)."""
    local = _head_outline_local(anat, margin=2.0)
    scanned = local[:, 2] > -anat.below - 10.0
    for t in np.linspace(1.0, 0.0, 11):
        moved = np.array([centre[0] * t, centre[1] * t, centre[2]])
        pts = moved + local[scanned] @ rot.T
        if np.hypot(pts[:, 0], pts[:, 1]).max() <= fov / 2 - 5.0:
            return moved
    return np.array([0.0, 0.0, centre[2]])


def _rotation(yaw: float, pitch: float, roll: float) -> np.ndarray:
    """Head-local -> scanner. Yaw about S, pitch about L (positive tips the chin down), roll about P."""
    y, p, r = np.radians([yaw, pitch, roll])
    rz = np.array([[math.cos(y), -math.sin(y), 0], [math.sin(y), math.cos(y), 0], [0, 0, 1]])
    rx = np.array([[1, 0, 0], [0, math.cos(p), -math.sin(p)], [0, math.sin(p), math.cos(p)]])
    ry = np.array([[math.cos(r), 0, math.sin(r)], [0, 1, 0], [-math.sin(r), 0, math.cos(r)]])
    return rz @ rx @ ry


def _sample_headrest(rng: np.random.Generator, anat: _Anatomy, rot: np.ndarray, centre: np.ndarray) -> dict:
    """A curved head holder behind the occiput: a real-scanner object the model must ignore."""
    semi = np.array([anat.a * (1 + anat.egg), anat.b, anat.c_down])      # the neck may reach further back
    back = centre[1] + math.sqrt(float(np.sum((rot[1] * semi) ** 2)))
    radius = _u(rng, (110.0, 150.0))
    thick = _u(rng, (3.0, 6.0))
    gap = _u(rng, (3.0, 15.0))
    return {"x": float(centre[0]), "y": back + gap + thick / 2 - radius, "radius": radius,
            "thickness": thick, "hu": _u(rng, (50.0, 300.0))}


# ============================================================================================
# The render grid (head-local, isotropic) and chunks of it
# ============================================================================================

@dataclass
class _Grid:
    origin: tuple[float, float, float]      # local (x, y, z) of voxel [0, 0, 0]
    h: float
    shape: tuple[int, int, int]             # (nz, ny, nx)

    def coords(self, axis: int, start: int, stop: int) -> np.ndarray:
        return (self.origin[axis] + self.h * np.arange(start, stop)).astype(np.float32)

    def index_range(self, axis: int, lo: float, hi: float) -> tuple[int, int]:
        n = self.shape[2 - axis]
        i0 = max(0, int(math.ceil((lo - self.origin[axis]) / self.h)))
        i1 = min(n, int(math.floor((hi - self.origin[axis]) / self.h)) + 1)
        return i0, i1


def _render_spacing(pixel_mm: float) -> float:
    """Finer than 0.75 mm costs time without visible gain once the kernel blurs; coarser than 1.6 mm
    loses sulci, unless the output pixels are so coarse that they are lost anyway."""
    return float(min(max(pixel_mm, 0.75), max(1.6, 0.67 * pixel_mm)))


def _render_grid(anat: _Anatomy, scan: _Scan) -> _Grid:
    h = _render_spacing(scan.pixel)
    ax = anat.a * (1 + anat.egg + abs(anat.asym)) + 2.0
    by = anat.b + 2.0
    r = scan.rotation
    # lowest local z that still reaches the first slice anywhere in the head's x/y extent
    z_lo = (-anat.below - abs(r[2, 0]) * ax - abs(r[2, 1]) * by) / max(r[2, 2], 0.2) - 2.0
    z_lo = max(z_lo, -anat.c_down)
    lo = (-ax, -by, z_lo)
    hi = (ax, by, anat.c + 2.0)
    shape = tuple(int(math.floor((hi[i] - lo[i]) / h)) + 1 for i in (2, 1, 0))
    return _Grid(_f3(lo), h, shape)


class _Chunk:
    """A box of the render grid with its coordinates, image views and shared fields."""

    def __init__(self, grid: _Grid, zr: tuple[int, int], yr: tuple[int, int], xr: tuple[int, int],
                 hu: np.ndarray, bits: np.ndarray):
        self.z = grid.coords(2, *zr)[:, None, None]
        self.y = grid.coords(1, *yr)[None, :, None]
        self.x = grid.coords(0, *xr)[None, None, :]
        self.hu = hu[zr[0]:zr[1], yr[0]:yr[1], xr[0]:xr[1]]
        self.bits = bits[zr[0]:zr[1], yr[0]:yr[1], xr[0]:xr[1]]
        self.f: dict[str, np.ndarray] = {}

    def sub(self, lo, hi) -> "_Sub | None":
        """The part of this chunk inside the local box [lo, hi] (x, y, z mm), or None."""
        sl = []
        for axis, coord in ((2, self.z), (1, self.y), (0, self.x)):
            c = coord.ravel()
            i0 = int(np.searchsorted(c, lo[axis], side="left"))
            i1 = int(np.searchsorted(c, hi[axis], side="right"))
            if i1 <= i0:
                return None
            sl.append(slice(i0, i1))
        return _Sub(self, tuple(sl))


class _Sub:
    """A structure's bounding box within a chunk: coordinates and views of everything there."""

    def __init__(self, chunk: _Chunk, sl: tuple[slice, slice, slice]):
        self.sl = sl
        self.z = chunk.z[sl[0]]
        self.y = chunk.y[:, sl[1]]
        self.x = chunk.x[:, :, sl[2]]
        self.hu = chunk.hu[sl]
        self.bits = chunk.bits[sl]
        self._chunk = chunk

    def __getattr__(self, name: str) -> np.ndarray:
        """A shared field of the chunk (d, a_in, b, di, e, bd, sulcus, xd, ...) cut to this box."""
        fields = self.__dict__["_chunk"].f if "_chunk" in self.__dict__ else {}
        if name not in fields:
            raise AttributeError(name)
        arr = fields[name]
        return arr[tuple(s if n > 1 else slice(None) for s, n in zip(self.sl, arr.shape))]


# ============================================================================================
# Drawing primitives: soft edges, compositing, distance fields
# ============================================================================================

def _inside(sd: np.ndarray, ew: float) -> np.ndarray:
    """Soft indicator of sd > 0 (sd in mm, positive inside), ramping over one edge width."""
    t = sd * (1.0 / ew)
    t += 0.5
    return np.clip(t, 0.0, 1.0, out=t)


def _paint(hu: np.ndarray, value, alpha: np.ndarray) -> None:
    """hu <- hu + alpha (value - hu), in place: partial volume of a structure over what is there."""
    t = value - hu
    t *= alpha
    hu += t


def _mark(bits: np.ndarray, bit: int, alpha: np.ndarray, threshold: float = 0.5) -> None:
    bits |= np.where(alpha > threshold, np.uint8(bit), np.uint8(0))


def _ellipsoid_sd(x, y, z, centre, semi) -> np.ndarray:
    """Approximate signed distance, positive inside (exact along the axes of a sphere)."""
    q = ((x - centre[0]) * (1.0 / semi[0])) ** 2 + ((y - centre[1]) * (1.0 / semi[1])) ** 2
    q = q + ((z - centre[2]) * (1.0 / semi[2])) ** 2
    np.sqrt(q, out=q)
    return (1.0 - q) * min(semi)


@dataclass
class _Ellipsoid:
    centre: tuple[float, float, float]
    semi: tuple[float, float, float]

    def box(self, margin: float, dx: float = 0.0):
        lo = tuple(self.centre[i] - self.semi[i] - margin - (dx if i == 0 else 0.0) for i in range(3))
        hi = tuple(self.centre[i] + self.semi[i] + margin + (dx if i == 0 else 0.0) for i in range(3))
        return lo, hi

    def sd(self, x, y, z) -> np.ndarray:
        return _ellipsoid_sd(x, y, z, self.centre, self.semi)

    def lowest_along(self, g: np.ndarray) -> float:
        """max over the ellipsoid of p.g: its most dependent point along gravity g."""
        return float(np.dot(self.centre, g) + math.sqrt(float(np.sum((np.asarray(self.semi) * g) ** 2))))


@dataclass
class _Tube:
    """Capsules through control points with linearly varying radius, stretched by `aniso`."""

    points: list[tuple[float, float, float]]
    radii: list[float]
    aniso: tuple[float, float, float]

    def box(self, margin: float, dx: float = 0.0):
        p = np.asarray(self.points)
        r = max(self.radii) * np.asarray(self.aniso)
        lo = p.min(0) - r - margin
        hi = p.max(0) + r + margin
        lo[0] -= dx
        hi[0] += dx
        return _f3(lo), _f3(hi)

    def sd(self, x, y, z) -> np.ndarray:
        """Signed distance (positive inside), in mm of the unstretched shape, union of the segments."""
        kx, ky, kz = (1.0 / s for s in self.aniso)
        xs, ys, zs = x * kx, y * ky, z * kz
        best = None
        for (p0, r0), (p1, r1) in zip(zip(self.points, self.radii), zip(self.points[1:], self.radii[1:])):
            a = (p0[0] * kx, p0[1] * ky, p0[2] * kz)
            u = (p1[0] * kx - a[0], p1[1] * ky - a[1], p1[2] * kz - a[2])
            uu = u[0] ** 2 + u[1] ** 2 + u[2] ** 2
            dx, dy, dz = xs - a[0], ys - a[1], zs - a[2]
            t = dx * (u[0] / uu) + dy * (u[1] / uu)
            t = t + dz * (u[2] / uu)
            np.clip(t, 0.0, 1.0, out=t)
            q = (dx - t * u[0]) ** 2 + (dy - t * u[1]) ** 2
            q += (dz - t * u[2]) ** 2
            np.sqrt(q, out=q)
            sd = (r0 + (r1 - r0) * t) - q
            best = sd if best is None else np.maximum(best, sd, out=best)
        return best

    def lowest_along(self, g: np.ndarray) -> float:
        return max(float(np.dot(p, g)) + r * float(np.linalg.norm(np.asarray(self.aniso) * g))
                   for p, r in zip(self.points, self.radii))


# ============================================================================================
# The scene: normal anatomy plus lesions, as structures with bounding boxes
# ============================================================================================

class _Scene:
    """Everything to draw for one phantom: anatomy landmarks, the midline shift, the lesions."""

    def __init__(self, anat: _Anatomy, rotation: np.ndarray, plan: _Plan, rng: np.random.Generator):
        self.anat = anat
        self.rotation = rotation
        self.plan = plan
        self.gravity = _f3(rotation.T @ np.array([0.0, 1.0, 0.0]))     # supine: posterior is down
        self.side = 1.0             # side of the mass-effect lesion (+1 = patient left)
        self.shift = 0.0            # signed x displacement of the midline, mm
        self.lesions: list = []
        self.lesion_info: dict[str, dict] = {}
        self._lesion_sides = {t: float(rng.choice([-1.0, 1.0])) for t in sorted(_LESION_BIT)}
        if plan.cause is not None:
            self.side = self._lesion_sides[plan.cause]
            self.shift = -self.side * plan.shift_mm
        self.ventricles = self._ventricles()
        self.deep = self._deep_structures()
        self._make_lesions(rng)

    # -- normal anatomy ------------------------------------------------------------------------

    def _ventricles(self) -> dict[str, object]:
        """Lateral ventricles as curved tubes (frontal horn, body, atrium, occipital and temporal
        horns), third and fourth ventricles; under mass effect the ipsilateral one is compressed
        and the contralateral one dilates (trapped)."""
        an = self.anat
        vs = an.vent_scale
        out: dict[str, object] = {}
        for name, sgn in (("left", 1.0), ("right", -1.0)):
            squeeze = -0.04 if sgn == self.side else 0.02
            k = vs * (1.0 + squeeze * self.plan.shift_mm)
            wide = 1.0 + 0.35 * (vs - 1.0)
            body = [(7, -34, 6), (8, -18, 12), (10, 0, 17), (16, 20, 16), (21, 32, 10), (18, 50, 6)]
            radii = [3.0, 4.5, 4.0, 4.5, 5.5, 2.5]
            temporal = [(21, 32, 10), (28, 15, -10), (27, -10, -20)]
            t_radii = [4.0, 2.6, 1.8]
            pts = [_ref(an, (sgn * p[0] * wide, p[1], p[2])) for p in body]
            out[f"lateral_{name}"] = _Tube(pts, [r * k * an.sc[0] for r in radii], (0.9, 1.0, 1.5))
            tpts = [_ref(an, (sgn * p[0] * wide, p[1], p[2])) for p in temporal]
            out[f"temporal_{name}"] = _Tube(tpts, [r * k * an.sc[0] for r in t_radii], (1.0, 1.0, 1.3))
        w3 = (1.2 + 2.5 * an.atrophy) * an.vent_scale
        out["third"] = _Ellipsoid(_ref(an, (0, 0, 0)), (w3, 12.0 * an.sc[1], 9.0 * an.sc[2]))
        out["fourth"] = _Ellipsoid(_ref(an, (0, 31, -40)), _ref(an, (5, 4, 7)))
        return out

    def _deep_structures(self) -> dict[str, _Ellipsoid]:
        an = self.anat
        d = {}
        for name, sgn in (("l", 1.0), ("r", -1.0)):
            d[f"thalamus_{name}"] = _Ellipsoid(_ref(an, (sgn * 11, 6, 2)), _ref(an, (8, 13, 9)))
            d[f"caudate_{name}"] = _Ellipsoid(_ref(an, (sgn * 14, -20, 10)), _ref(an, (5, 8, 8)))
            d[f"lentiform_{name}"] = _Ellipsoid(_ref(an, (sgn * 24, -2, 2)), _ref(an, (6, 16, 10)))
        d["midbrain"] = _Ellipsoid(_ref(an, (0, 10, -18)), _ref(an, (11, 10, 8)))
        d["pons"] = _Ellipsoid(_ref(an, (0, 16, -38)), _ref(an, (13, 10, 13)))
        return d

    def cisterns(self) -> list[tuple[_Ellipsoid, _Ellipsoid | None]]:
        """CSF spaces (outer shape, carved-out brainstem) that open into the e field."""
        an, d = self.anat, self.deep
        return [
            (_Ellipsoid(_ref(an, (0, 10, -18)), _ref(an, (15.5, 14.5, 10.5))), d["midbrain"]),
            (_Ellipsoid(_ref(an, (0, -12, -24)), _ref(an, (12, 7, 4.5))), None),
            (_Ellipsoid(_ref(an, (0, 13, -38)), _ref(an, (14.5, 13.5, 14.5))), d["pons"]),
        ]

    # -- lesions -------------------------------------------------------------------------------

    def _make_lesions(self, rng: np.random.Generator) -> None:
        order = ["epidural", "subdural", "intraparenchymal", "subarachnoid", "intraventricular", "fracture"]
        makers = {"intraparenchymal": _make_iph, "intraventricular": _make_ivh, "subarachnoid": _make_sah,
                  "subdural": _make_sdh, "epidural": _make_edh, "fracture": _make_fracture}
        for name in order:
            if name in self.plan.findings:
                lesion = makers[name](self, rng, self._lesion_sides[name], big=self.plan.cause == name)
                self.lesions.append(lesion)
                self.lesion_info[name] = lesion.info

    def inner_table_point(self, direction) -> tuple[float, float, float]:
        """Where a ray from the centre meets the inner table (approximately), local mm."""
        return self.surface_point(direction, self.anat.scalp_t + self.anat.skull_t)

    def surface_point(self, direction, depth: float) -> tuple[float, float, float]:
        """The point `depth` mm below the skin along a ray from the centre (approximately)."""
        an = self.anat
        u = _unit(direction)
        ax = an.a * (1 + an.egg * u[1])
        cz = an.c if u[2] > 0 else an.c_down
        r = 1.0 / math.sqrt((u[0] / ax) ** 2 + (u[1] / an.b) ** 2 + (u[2] / cz) ** 2)
        return _f3(u * (r - depth))

    def displacement_box_dx(self) -> float:
        return abs(self.shift)


# ============================================================================================
# Lesions: each knows its bounding box, how to draw itself, and what to record
# ============================================================================================

@dataclass
class _IPH:
    """Intraparenchymal hematoma: a lumpy hyperdense ellipsoid with a hypodense edema rim."""

    centre: tuple[float, float, float]
    semi: tuple[float, float, float]
    lumps: list[tuple[tuple[float, float, float], float, float]]     # (wave vector, phase, amplitude)
    hu: float
    edema: float           # rim width as a fraction of the radius
    edema_hu: float
    info: dict = field(default_factory=dict)

    def box(self):
        m = 1.0 + self.edema + sum(l[2] for l in self.lumps)
        return (tuple(c - s * m - 2 for c, s in zip(self.centre, self.semi)),
                tuple(c + s * m + 2 for c, s in zip(self.centre, self.semi)))

    def paint(self, s: _Sub, ew: float) -> None:
        u = (s.x - self.centre[0]) * (1.0 / self.semi[0])
        v = (s.y - self.centre[1]) * (1.0 / self.semi[1])
        w = (s.z - self.centre[2]) * (1.0 / self.semi[2])
        q = u * u + v * v
        q = q + w * w
        np.sqrt(q, out=q)
        lump = np.ones_like(q)
        for k, phase, amp in self.lumps:
            arg = u * k[0] + v * k[1]
            arg = arg + w * k[2] + phase
            lump += amp * np.cos(arg)
        q /= lump
        r = float(np.mean(self.semi))
        cav = _inside(s.di, ew)
        edema = _inside((1.0 + self.edema - q) * r, ew) * _inside(s.e, ew) * cav
        _paint(s.hu, self.edema_hu, edema)
        blood = _inside((1.0 - q) * r, ew) * cav
        _paint(s.hu, self.hu, blood)
        _mark(s.bits, _LESION_BIT["intraparenchymal"], blood)


def _make_iph(scene: _Scene, rng: np.random.Generator, side: float, big: bool) -> _IPH:
    an = scene.anat
    if rng.random() < 0.5:      # deep (hypertensive): basal ganglia / thalamus
        centre = _ref(an, (side * _u(rng, (16, 26)), _u(rng, (-12, 8)), _u(rng, (-4, 10))))
        where = "deep"
    else:                       # lobar
        u = _unit((side * _u(rng, (0.4, 1.0)), _u(rng, (-1, 1)), _u(rng, (-0.1, 0.8))))
        frac = _u(rng, (0.35, 0.55))
        centre = _f3(u * frac * np.array([an.a - 14, an.b - 14, an.c - 14]))
        where = "lobar"
    diameter = _u(rng, (32.0, 50.0) if big else (10.0, 30.0))
    semi = _f3(diameter / 2 * np.array([_u(rng, (0.8, 1.2)) for _ in range(3)]))
    lumps = [(_f3(_unit(rng.normal(size=3)) * _u(rng, (2.0, 5.0))), _u(rng, (0, 2 * math.pi)), _u(rng, (0.04, 0.12)))
             for _ in range(4)]
    hu = _u(rng, (55.0, 85.0))
    edema = _u(rng, (0.15, 0.5))
    lesion = _IPH(centre, semi, lumps, hu, edema, an.hu["wm"] - _u(rng, (6.0, 12.0)))
    lesion.info = {"where": where, "diameter_mm": diameter, "hu": hu, "side": side, "centre_local_mm": list(centre)}
    return lesion


@dataclass
class _ExtraAxial:
    """Subdural crescent or epidural lens, lying on the inner table of one hemisphere.

    Thickness falls off with lateral distance r from its centre as (1 - (r/R)^2)^p: p small gives
    the even crescent of a subdural, p = 0.5 the biconvex lens of an epidural.
    """

    name: str
    point: tuple[float, float, float]     # on the inner table
    side: float
    thickness: float
    extent: float
    power: float
    hu: float
    info: dict = field(default_factory=dict)

    def box(self):
        m = self.extent + self.thickness + 4.0
        return tuple(p - m for p in self.point), tuple(p + m for p in self.point)

    def paint(self, s: _Sub, ew: float) -> None:
        a_in = s.a_in
        r2 = (s.x - self.point[0]) ** 2 + (s.y - self.point[1]) ** 2
        r2 = r2 + (s.z - self.point[2]) ** 2
        r2 -= np.maximum(a_in, 0.0) ** 2
        prof = np.clip(1.0 - r2 * (1.0 / self.extent ** 2), 0.0, 1.0)
        prof **= self.power
        sd = np.minimum(prof * self.thickness - a_in, a_in + 0.5 * ew)
        np.minimum(sd, s.b, out=sd)
        np.minimum(sd, s.xd * self.side - 0.5, out=sd)          # the falx stops it at the midline
        alpha = _inside(sd, ew)
        _paint(s.hu, self.hu, alpha)
        _mark(s.bits, _LESION_BIT[self.name], alpha)


def _convexity_direction(rng: np.random.Generator, side: float, lateral: Range, ap: Range, si: Range) -> np.ndarray:
    return _unit((side * _u(rng, lateral), _u(rng, ap), _u(rng, si)))


def _make_sdh(scene: _Scene, rng: np.random.Generator, side: float, big: bool) -> _ExtraAxial:
    u = _convexity_direction(rng, side, (0.5, 1.0), (-0.8, 0.6), (-0.1, 0.8))
    thickness = _u(rng, (11.0, 19.0) if big else (5.0, 12.0))
    return _extra_axial(scene, "subdural", u, side, thickness, _u(rng, (50.0, 80.0)), 0.3, _u(rng, (50.0, 80.0)))


def _make_edh(scene: _Scene, rng: np.random.Generator, side: float, big: bool) -> _ExtraAxial:
    u = _convexity_direction(rng, side, (0.7, 1.0), (-0.5, 0.5), (-0.25, 0.5))
    thickness = _u(rng, (18.0, 28.0) if big else (10.0, 20.0))
    return _extra_axial(scene, "epidural", u, side, thickness, _u(rng, (24.0, 36.0)), 0.5, _u(rng, (60.0, 90.0)))


def _extra_axial(scene: _Scene, name: str, u: np.ndarray, side: float, thickness: float, extent: float,
                 power: float, hu: float) -> _ExtraAxial:
    point = scene.inner_table_point(u)
    lesion = _ExtraAxial(name, point, side, thickness, extent, power, hu)
    lesion.info = {"thickness_mm": thickness, "extent_mm": 2 * extent, "hu": hu, "side": side,
                   "centre_local_mm": list(point), "direction": list(_f3(u))}
    return lesion


@dataclass
class _SAH:
    """Subarachnoid blood: the CSF clefts (widened a little) inside a region turn hyperdense."""

    centre: tuple[float, float, float]
    semi: tuple[float, float, float]
    extra_width: float
    hu: float
    sulc_w: float
    info: dict = field(default_factory=dict)

    def box(self):
        return (tuple(c - s - 2 for c, s in zip(self.centre, self.semi)),
                tuple(c + s + 2 for c, s in zip(self.centre, self.semi)))

    def paint(self, s: _Sub, ew: float) -> None:
        e = np.minimum(s.e, _sulcal_cleft(s.sulcus, s.sulcus_depth, s.bd, self.sulc_w + self.extra_width))
        alpha = _inside(-e, ew) * _inside(s.di, ew) * _inside(_ellipsoid_sd(s.x, s.y, s.z, self.centre, self.semi), 4.0)
        _paint(s.hu, self.hu, alpha)
        _mark(s.bits, _LESION_BIT["subarachnoid"], alpha, 0.35)


def _make_sah(scene: _Scene, rng: np.random.Generator, side: float, big: bool) -> _SAH:
    an = scene.anat
    hu = _u(rng, (45.0, 70.0))
    if rng.random() < 0.5:      # aneurysmal: basal cisterns, Sylvian fissures
        centre = _ref(an, (side * _u(rng, (0, 8)), _u(rng, (-14, 0)), _u(rng, (-22, -12))))
        semi = _ref(an, (_u(rng, (30, 50)), _u(rng, (22, 34)), _u(rng, (12, 20))))
        where = "basal"
    else:                       # traumatic: convexity sulci
        u = _convexity_direction(rng, side, (0.3, 1.0), (-0.8, 0.8), (0.0, 1.0))
        centre = scene.inner_table_point(u)
        r = _u(rng, (22.0, 40.0))
        semi = (r, r, r)
        where = "convexity"
    lesion = _SAH(centre, _f3(semi), _u(rng, (0.8, 1.8)), hu, an.sulc_w)
    lesion.info = {"where": where, "hu": hu, "side": side, "centre_local_mm": list(centre)}
    return lesion


@dataclass
class _IVH:
    """Intraventricular blood: dependent layering in the occipital horns, or a cast of a ventricle."""

    parts: list[tuple[object, float]]       # (ventricle shape, level along gravity above which it fills)
    gravity: tuple[float, float, float]
    hu: float
    dx: float
    info: dict = field(default_factory=dict)

    def box(self):
        boxes = [v.box(1.0, self.dx) for v, _ in self.parts]
        return (tuple(min(b[0][i] for b in boxes) for i in range(3)),
                tuple(max(b[1][i] for b in boxes) for i in range(3)))

    def paint(self, s: _Sub, ew: float) -> None:
        g = self.gravity
        depth = s.x * g[0] + s.y * g[1]
        depth = depth + s.z * g[2]
        for vent, level in self.parts:
            alpha = _inside(vent.sd(s.xd, s.y, s.z), ew) * _inside(depth - level, ew)
            _paint(s.hu, self.hu, alpha)
            _mark(s.bits, _LESION_BIT["intraventricular"], alpha, 0.4)


def _make_ivh(scene: _Scene, rng: np.random.Generator, side: float, big: bool) -> _IVH:
    v = scene.ventricles
    g = np.asarray(scene.gravity)
    hu = _u(rng, (50.0, 80.0))
    if rng.random() < 0.6:
        names = ["lateral_left", "lateral_right"] if rng.random() < 0.5 else [
            "lateral_left" if side > 0 else "lateral_right"]
        fill = _u(rng, (6.0, 14.0))
        parts = [(v[n], v[n].lowest_along(g) - fill) for n in names]
        mode = "layering"
    else:
        names = ["lateral_left" if side > 0 else "lateral_right", "third"]
        if rng.random() < 0.5:
            names.append("fourth")
        parts = [(v[n], -1e3) for n in names]
        fill = None
        mode = "cast"
    lesion = _IVH(parts, scene.gravity, hu, scene.displacement_box_dx())
    lesion.info = {"mode": mode, "ventricles": names, "fill_mm": fill, "hu": hu}
    return lesion


@dataclass
class _Fracture:
    """A lucent gap through the skull along a wavy line; the mask is the gap dilated by 1.5 mm."""

    point: tuple[float, float, float]       # in the skull
    normal: tuple[float, float, float]      # of the fracture plane (tangent to the skull)
    along: tuple[float, float, float]       # direction of the line on the skull
    half_length: float
    width: float
    wobble: tuple[float, float, float]      # amplitude, wave number, phase
    hu: float
    info: dict = field(default_factory=dict)

    def box(self):
        m = self.half_length + 20.0
        return tuple(p - m for p in self.point), tuple(p + m for p in self.point)

    def paint(self, s: _Sub, ew: float) -> None:
        p, n, t = self.point, self.normal, self.along
        dx, dy, dz = s.x - p[0], s.y - p[1], s.z - p[2]
        along = dx * t[0] + dy * t[1]
        along = along + dz * t[2]
        dist = dx * n[0] + dy * n[1]
        dist = dist + dz * n[2]
        amp, k, phase = self.wobble
        dist += amp * np.sin(along * k + phase)
        np.abs(dist, out=dist)
        np.abs(along, out=along)
        shell = np.minimum(s.d - s.st, -s.a_in)           # > 0 inside the skull
        gap = np.minimum(0.5 * self.width - dist, self.half_length - along)
        alpha = _inside(np.minimum(gap, shell + 0.5), ew)
        _paint(s.hu, self.hu, alpha)
        grown = np.minimum(gap + 1.5, shell + 1.5)
        _mark(s.bits, _LESION_BIT["fracture"], _inside(grown, ew))


def _make_fracture(scene: _Scene, rng: np.random.Generator, side: float, big: bool) -> _Fracture:
    an = scene.anat
    edh = scene.lesion_info.get("epidural")
    if edh is not None and rng.random() < 0.85:
        u = _unit(np.asarray(edh["direction"]) + rng.normal(scale=0.12, size=3))
    else:
        u = _convexity_direction(rng, side, (0.2, 1.0), (-0.9, 0.9), (0.0, 0.9))
    point = scene.surface_point(u, an.scalp_t + 0.5 * an.skull_t)
    t = _unit(np.cross(u, rng.normal(size=3)))
    n = _unit(np.cross(u, t))
    length = _u(rng, (20.0, 60.0))
    width = _u(rng, (1.0, 3.0))
    lesion = _Fracture(point, _f3(n), _f3(t), length / 2, width,
                       (_u(rng, (0.4, 1.8)), 2 * math.pi / _u(rng, (8.0, 20.0)), _u(rng, (0, 2 * math.pi))),
                       _u(rng, (10.0, 45.0)))
    lesion.info = {"length_mm": length, "width_mm": width, "centre_local_mm": list(point),
                   "side": 1.0 if u[0] > 0 else -1.0}
    return lesion


# ============================================================================================
# Rendering in the head frame
# ============================================================================================

def _render(scene: _Scene, grid: _Grid) -> tuple[np.ndarray, np.ndarray]:
    """HU and lesion bits on the render grid, chunk by chunk, each chunk cropped to the head."""
    hu = np.full(grid.shape, _AIR, dtype=np.float32)
    bits = np.zeros(grid.shape, dtype=np.uint8)
    sulci = _SulcalPattern(scene.anat, grid)
    ew = max(grid.h, scene.anat.kernel_fwhm)
    step = max(4, _CHUNK_VOXELS // (grid.shape[1] * grid.shape[2]))
    for z0 in range(0, grid.shape[0], step):
        zr = (z0, min(z0 + step, grid.shape[0]))
        yr, xr = _head_rows(scene.anat, grid, zr)
        if yr[1] <= yr[0] or xr[1] <= xr[0]:
            continue
        ch = _Chunk(grid, zr, yr, xr, hu, bits)
        ch.f["sulcus"], ch.f["sulcus_depth"] = sulci.sample(zr, yr, xr)
        _base_fields(scene, ch)
        _cleft_fields(scene, ch, ew)
        _paint_tissues(scene, ch, ew)
        _paint_structures(scene, ch, ew)
        for lesion in scene.lesions:
            sub = ch.sub(*lesion.box())
            if sub is not None:
                lesion.paint(sub, ew)
    return hu, bits


def _head_rows(anat: _Anatomy, grid: _Grid, zr: tuple[int, int]) -> tuple[tuple[int, int], tuple[int, int]]:
    """y and x index ranges of the head's cross-section over these render slices."""
    z = grid.coords(2, *zr)
    zmin = float(np.min(np.abs(z))) if z[0] * z[-1] > 0 else 0.0
    cz = anat.c if z[0] > 0 else anat.c_down
    f = math.sqrt(max(0.0, 1.0 - (zmin / cz) ** 2))
    ax = anat.a * (1 + anat.egg + abs(anat.asym)) * f + 1.0
    by = anat.b * f + 1.0
    return grid.index_range(1, -by, by), grid.index_range(0, -ax, ax)


class _SulcalPattern:
    """Where the sulci are: distance (mm) to the nearest sulcus, and how deep sulci go there.

    Sulci are radial clefts, so a random gyral pattern over directions (the zero set of a band-
    limited random field on the sphere) is extruded along rays from the centre. Its signed angular
    distance f / |grad f| is tabulated on a latitude-longitude map, looked up on a coarse grid
    (times the radius gives mm), and interpolated onto each chunk by SimpleITK (C++): far cheaper
    than evaluating waves on every voxel.
    """

    def __init__(self, anat: _Anatomy, grid: _Grid, hc: float = 2.5):
        self.grid = grid
        self.depth_mm = anat.sulc_depth
        lo = np.asarray(grid.origin) - hc
        n = np.floor((np.asarray(grid.shape[::-1]) - 1) * grid.h / hc).astype(int) + 3
        x = (lo[0] + hc * np.arange(n[0], dtype=np.float32))[None, None, :]
        y = (lo[1] + hc * np.arange(n[1], dtype=np.float32))[None, :, None]
        z = (lo[2] + hc * np.arange(n[2], dtype=np.float32))[:, None, None]
        r = np.sqrt(x * x + y * y + z * z) + 1e-3
        theta = np.arccos(np.clip(z / r, -1.0, 1.0))
        phi = np.arctan2(y, x) + np.zeros_like(theta)
        angular, depth = _sulcal_maps(anat)
        lookup = _SphereLookup(theta, phi)
        self.images = [self._image(lookup(angular) * r, lo, hc), self._image(lookup(depth), lo, hc)]

    @staticmethod
    def _image(arr: np.ndarray, lo: np.ndarray, hc: float) -> sitk.Image:
        img = sitk.GetImageFromArray(arr.astype(np.float32, copy=False))
        img.SetSpacing((hc, hc, hc))
        img.SetOrigin(_f3(lo))
        return img

    def sample(self, zr: tuple[int, int], yr: tuple[int, int], xr: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
        """(distance to sulcus, sulcal depth) in mm on a box of the render grid."""
        g = self.grid
        f = sitk.ResampleImageFilter()
        f.SetSize((xr[1] - xr[0], yr[1] - yr[0], zr[1] - zr[0]))
        f.SetOutputSpacing((g.h,) * 3)
        f.SetOutputOrigin(tuple(g.origin[i] + g.h * start for i, start in enumerate((xr[0], yr[0], zr[0]))))
        f.SetInterpolator(sitk.sitkLinear)
        f.SetDefaultPixelValue(1.0)
        distance, depth = (sitk.GetArrayFromImage(f.Execute(img)) for img in self.images)
        np.abs(distance, out=distance)
        depth *= self.depth_mm
        return distance, depth


_MAP_STEPS = (90, 180)      # latitude, longitude samples of the maps over directions (2 degrees)


def _sulcal_maps(anat: _Anatomy) -> tuple[np.ndarray, np.ndarray]:
    """Signed angular distance (radians) to the nearest sulcus, and relative sulcal depth, over directions.

    Signed, so interpolation keeps the zero crossing; the absolute value is taken on the fine grid.
    """
    nt, nph = _MAP_STEPS
    r0 = 70.0 * anat.sc[1]
    f = _random_sphere_field(anat.sulc_waves, anat.sulc_kappa * r0)
    sin_t = np.maximum(np.sin(np.linspace(0.0, math.pi, nt + 1)), math.sin(math.radians(1.0)))[:, None]
    f_t = np.gradient(f, math.pi / nt, axis=0)
    f_p = np.gradient(f, 2 * math.pi / nph, axis=1) / sin_t
    grad = np.sqrt(f_t * f_t + f_p * f_p)
    angular = f / np.maximum(grad, 0.3 * anat.sulc_kappa * r0)        # signed: smooth through the sulcus
    g = _random_sphere_field(anat.depth_waves, 0.5 * anat.sulc_kappa * r0)
    depth = np.clip(1.0 + 0.4 * g, 0.4, 1.8)
    return angular.astype(np.float32), depth.astype(np.float32)


def _random_sphere_field(waves: tuple[list, list, list], kappa_r: float) -> np.ndarray:
    """A unit-variance random field over directions (sum of waves), on the latitude-longitude grid."""
    nt, nph = _MAP_STEPS
    theta = np.linspace(0.0, math.pi, nt + 1)[:, None]
    phi = np.linspace(-math.pi, math.pi, nph + 1)[None, :]
    u = np.stack(np.broadcast_arrays(np.sin(theta) * np.cos(phi), np.sin(theta) * np.sin(phi), np.cos(theta)), -1)
    dirs, scales, phases = (np.asarray(w, dtype=np.float32) for w in waves)
    arg = (u.astype(np.float32) @ dirs.T) * (kappa_r * scales) + phases
    return np.cos(arg).sum(-1) * np.float32(math.sqrt(2.0 / len(dirs)))


class _SphereLookup:
    """Bilinear lookups of latitude-longitude tables at fixed directions (indices computed once)."""

    def __init__(self, theta: np.ndarray, phi: np.ndarray):
        nt, nph = _MAP_STEPS
        ti = theta * (nt / math.pi)
        pj = (phi + math.pi) * (nph / (2 * math.pi))
        i0 = np.clip(np.floor(ti).astype(np.int64), 0, nt - 1)
        j0 = np.clip(np.floor(pj).astype(np.int64), 0, nph - 1)
        self.wi = (ti - i0).astype(np.float32)
        self.wj = (pj - j0).astype(np.float32)
        self.base = i0 * (nph + 1) + j0
        self.row = nph + 1

    def __call__(self, table: np.ndarray) -> np.ndarray:
        flat = table.ravel()
        b, w = self.base, self.row
        top = flat[b] * (1 - self.wj) + flat[b + 1] * self.wj
        bottom = flat[b + w] * (1 - self.wj) + flat[b + w + 1] * self.wj
        return top * (1 - self.wi) + bottom * self.wi


def _base_fields(scene: _Scene, ch: _Chunk) -> None:
    """Depths that every layer is drawn from.

    d: depth below the skin (first-order distance to the head ellipsoid: exact along its axes);
    a_in: depth below the inner table; b: height above the skull base; di = min(a_in, b): depth
    inside the cranial cavity; xd: x in the brain's displaced frame (mass effect).
    """
    an = scene.anat
    x, y, z = ch.x, ch.y, ch.z
    ax = an.a * (1.0 + an.egg * y * (1.0 / an.b)) * (1.0 + an.asym * np.sign(x) * y * (1.0 / an.b))
    iax = 1.0 / ax
    cz = np.where(z > 0, np.float32(an.c), np.float32(an.c_down))
    u = x * iax
    v = y * (1.0 / an.b)
    w = z / cz
    rho2 = (u * u + v * v) + w * w
    g2 = (u * iax) ** 2 + (v * (1.0 / an.b)) ** 2 + (w / cz) ** 2
    rho = np.sqrt(rho2)
    np.maximum(g2, 1e-12, out=g2)
    np.sqrt(g2, out=g2)
    d = (1.0 - rho) * rho
    d /= g2
    # temporal squama: thin bone under a thick temporalis muscle, low on the sides
    side = np.clip((np.abs(u) - 0.55) * 4.0, 0.0, 1.0) * np.clip((20.0 * an.sc[1] - y) * 0.05, 0.0, 1.0)
    temporal = side * np.clip((30.0 * an.sc[2] - z) * (1.0 / 15.0), 0.0, 1.0)
    st = an.scalp_t + an.temporalis * temporal
    sk = an.skull_t * (1.0 - 0.45 * temporal)
    if an.frontal_sinus:
        sinus = np.exp(-(x * (1.0 / 16.0)) ** 2 - ((z + 8.0 * an.sc[2]) * (1.0 / 12.0)) ** 2)
        sinus = sinus * np.clip((-0.55 * an.b - y) * 0.2, 0.0, 1.0)
        ch.f["sinus"] = sinus
        sk = sk + an.frontal_sinus * sinus
    a_in = d - st
    a_in -= sk
    b = z - _z_floor(an, x, y)
    di = np.minimum(a_in, b)
    xd = x
    if scene.shift:
        # the midline moves most deep in the brain and not at all where the falx meets the skull
        xd = x - scene.shift * np.clip(1.3 * (1.0 - rho2), 0.0, 1.0)
    ch.f.update(rho2=rho2, d=d, st=st, sk=sk, a_in=a_in, b=b, di=di, xd=xd)


def _cleft_fields(scene: _Scene, ch: _Chunk, ew: float) -> None:
    """e: distance to the nearest CSF cleft or surface inside the brain; < 0 is CSF, > 0 brain.

    Sulci, the interhemispheric and Sylvian fissures and the basal cisterns all open into it,
    so every one of them is lined by cortex and subarachnoid blood can fill any of them.
    """
    an = scene.anat
    f = ch.f
    csf_t = an.csf_t
    sulc_w = an.sulc_w
    if scene.shift:         # effacement on the side of the mass
        ipsi = (np.sign(ch.x) == scene.side).astype(np.float32)
        csf_t = an.csf_t * (1.0 - 0.6 * ipsi)
        sulc_w = an.sulc_w * (1.0 - 0.06 * scene.plan.shift_mm * ipsi)
    bd = f["di"] - csf_t
    e = _sulcal_cleft(f["sulcus"], f["sulcus_depth"], bd, sulc_w)
    np.minimum(e, bd, out=e)
    f.update(bd=bd, e=e)
    _open_interhemispheric(scene, ch)
    _open_sylvian(scene, ch)
    for outer, carved in scene.cisterns():
        sub = ch.sub(*outer.box(2.0, scene.displacement_box_dx()))
        if sub is not None:
            sd = -outer.sd(sub.xd, sub.y, sub.z)
            if carved is not None:
                np.maximum(sd, carved.sd(sub.xd, sub.y, sub.z), out=sd)
            sd[sd > 0.5 * ew] = 1e3         # no cortex lines the cisterns (brainstem, uncus)
            np.minimum(sub.e, sd, out=sub.e)


def _sulcal_cleft(s: np.ndarray, depth: np.ndarray, bd: np.ndarray, width) -> np.ndarray:
    """Distance into brain from the sulcal clefts: a V-shaped cleft, widest at the surface, to a varying depth."""
    taper = np.clip(bd / depth, 0.0, 1.0)
    taper *= -0.6
    taper += 1.0
    taper *= -0.5 * width
    taper += s
    return np.maximum(taper, bd - depth, out=taper)


def _open_interhemispheric(scene: _Scene, ch: _Chunk) -> None:
    """The fissure between the hemispheres: down to the corpus callosum, all the way in front and behind it."""
    an = scene.anat
    half = 0.5 * an.ihf_w
    reach = half + an.gm_t + 3.0 + abs(scene.shift)
    sub = ch.sub((-reach, -1e3, -30.0 * an.sc[2]), (reach, 1e3, 1e3))
    if sub is None:
        return
    t = np.maximum(np.abs(sub.xd) - half, _z_callosum(an, sub.y) - sub.z)
    np.minimum(sub.e, t, out=sub.e)


def _open_sylvian(scene: _Scene, ch: _Chunk) -> None:
    """Each Sylvian fissure: an oblique sheet of CSF from the insula to the lateral surface."""
    an = scene.anat
    sx, sy, sz = an.sc
    half = 0.5 * (1.5 + 2.5 * an.atrophy)
    slope = 0.8
    norm = math.sqrt(1.0 + slope ** 2 + (0.4 * slope) ** 2)
    p1, p2 = an.sylvian_phase
    for sgn in (1.0, -1.0):
        lo = (min(sgn * 32 * sx, sgn * 90 * sx) - abs(scene.shift), -50.0 * sy, -40.0 * sz)
        hi = (max(sgn * 32 * sx, sgn * 90 * sx) + abs(scene.shift), 20.0 * sy, 25.0 * sz)
        sub = ch.sub(lo, hi)
        if sub is None:
            continue
        ax_ = np.abs(sub.xd)
        plane = (sub.z + 8.0 * sz) - slope * (sub.y + 5.0 * sy + 0.4 * (ax_ - 35.0 * sx))
        plane += 2.5 * np.sin(ax_ * 0.25 + p1 * sgn) + 2.0 * np.sin(sub.y * 0.3 + p2 * sgn)    # not a flat sheet
        t = np.abs(plane) * (1.0 / norm) - half
        np.maximum(t, 33.0 * sx - sgn * sub.xd, out=t)
        np.maximum(t, np.abs(sub.y + 15.0 * sy) - 30.0 * sy, out=t)
        np.minimum(sub.e, t, out=sub.e)


def _paint_tissues(scene: _Scene, ch: _Chunk, ew: float) -> None:
    """Scalp, skull (tables and diploe, frontal sinus), CSF, cortex and white matter, by depth."""
    an, f, hu = scene.anat, ch.f, ch.hu
    H = an.hu
    _paint(hu, H["muscle"], _inside(f["d"], ew))
    fat = np.minimum(f["d"] - an.skin_t, an.skin_t + an.fat_t - f["d"])
    _paint(hu, H["fat"], _inside(fat, ew))
    # bone: inside the outer table and above the underside of the skull base
    bone = _inside(np.minimum(f["a_in"] + f["sk"], f["b"] + an.base_t), ew) * _inside(f["d"] - f["st"], ew)
    table = 0.28 * an.skull_t
    diploe = _inside(0.5 * f["sk"] - table - np.abs(f["a_in"] + 0.5 * f["sk"]), ew)
    diploe_hu = H["diploe"]
    if "sinus" in f:
        diploe_hu = H["diploe"] + (H["sinus"] - H["diploe"]) * np.clip(2.0 * f["sinus"] - 0.4, 0.0, 1.0)
    _paint(hu, H["bone"] + (diploe_hu - H["bone"]) * diploe, bone)
    _paint(hu, H["csf"], _inside(f["di"], ew))
    e = f["e"]
    brain = H["wm"] + (H["gm"] - H["wm"]) * _inside(an.gm_t - e, ew)
    _paint(hu, brain, _inside(e, ew))


def _paint_structures(scene: _Scene, ch: _Chunk, ew: float) -> None:
    """Face and skull base below, deep grey nuclei, brainstem, ventricles, falx, calcifications."""
    an, H = scene.anat, scene.anat.hu
    dx = scene.displacement_box_dx()
    _paint_skull_base(scene, ch, ew)
    for name, ell in scene.deep.items():
        sub = ch.sub(*ell.box(2.0, dx))
        if sub is not None:
            value = H["stem"] if name in ("midbrain", "pons") else H["nuclei"]
            _paint(sub.hu, value, _inside(ell.sd(sub.xd, sub.y, sub.z), ew))
    for vent in scene.ventricles.values():
        sub = ch.sub(*vent.box(2.0, dx))
        if sub is not None:
            alpha = _inside(vent.sd(sub.xd, sub.y, sub.z), ew)
            _paint(sub.hu, H["csf"], alpha)
            if scene.shift:
                _mark(sub.bits, _MIDLINE_BIT, alpha)
    _paint_falx(scene, ch, ew)
    calcs = []
    if an.calc_choroid:
        wide = 1 + 0.35 * (an.vent_scale - 1)
        calcs += [(_ref(an, (s * 21 * wide, 32, 10)), 2.5, an.calc_choroid) for s in (1, -1)]
    if an.calc_pineal:
        calcs.append((_ref(an, (0, 17, 3)), 2.2, an.calc_pineal))
    for centre, r, value in calcs:
        ell = _Ellipsoid(centre, (r, r, r))
        sub = ch.sub(*ell.box(1.0, dx))
        if sub is not None:
            _paint(sub.hu, value, _inside(ell.sd(sub.xd, sub.y, sub.z), ew))


def _paint_falx(scene: _Scene, ch: _Chunk, ew: float) -> None:
    """The dense dural sheet in the fissure; under mass effect, also marks the displaced midline."""
    an = scene.anat
    reach = 4.0 + abs(scene.shift) + an.ihf_w
    sub = ch.sub((-reach, -1e3, -25.0 * an.sc[2]), (reach, 1e3, 1e3))
    if sub is None:
        return
    above = sub.z - (_z_callosum(an, sub.y) + 4.0 * an.sc[2])
    ax_ = np.abs(sub.xd)
    alpha = _inside(np.minimum(np.minimum(0.5 - ax_, above), sub.di), ew * 0.75)
    _paint(sub.hu, an.hu["falx"], alpha)
    if scene.shift:
        moved = np.abs(sub.xd - sub.x) - 1.0
        region = np.minimum(np.minimum(0.5 * an.ihf_w + 1.5 - ax_, sub.di), moved)
        region = np.minimum(region, sub.z - _z_callosum(an, sub.y) + 5.0)
        _mark(sub.bits, _MIDLINE_BIT, _inside(region, ew))


def _paint_skull_base(scene: _Scene, ch: _Chunk, ew: float) -> None:
    """Petrous ridges, orbits (fat, globe, lens) and sinus air under the anterior and middle fossae."""
    an, H = scene.anat, scene.anat.hu
    for sgn in (1.0, -1.0):
        ridge = _Tube([_ref(an, (sgn * 54, 30, -52)), _ref(an, (sgn * 14, 5, -45))], [6.0, 3.5], (1.0, 1.0, 1.0))
        sub = ch.sub(*ridge.box(2.0))
        if sub is not None:
            _paint(sub.hu, H["bone"], _inside(ridge.sd(sub.x, sub.y, sub.z), ew))
        fat = _Ellipsoid(_ref(an, (sgn * 29, -60, -41)), _ref(an, (16, 24, 14)))
        globe = _Ellipsoid(_ref(an, (sgn * 31, -(93 - 20), -42)), (12.0, 12.0, 12.0))
        lens = _Ellipsoid(_f3(np.add(globe.centre, (0.0, -10.5, 0.0))), (4.0, 1.8, 4.0))
        sub = ch.sub(*fat.box(4.0))
        if sub is None:
            continue
        below = _inside(-(sub.b + an.base_t), ew) * _inside(sub.d - an.skin_t, ew)
        _paint(sub.hu, H["bone"] * 0.5, _inside(fat.sd(sub.x, sub.y, sub.z) + 1.5, ew) * below)
        _paint(sub.hu, H["fat"], _inside(fat.sd(sub.x, sub.y, sub.z), ew) * below)
        _paint(sub.hu, H["globe"], _inside(globe.sd(sub.x, sub.y, sub.z), ew) * below)
        _paint(sub.hu, H["lens"], _inside(lens.sd(sub.x, sub.y, sub.z), ew) * below)
    for centre, semi in (((0, -62, -46), (9, 17, 11)), ((0, -16, -57), (13, 11, 8))):
        air = _Ellipsoid(_ref(an, centre), _ref(an, semi))
        sub = ch.sub(*air.box(4.0))
        if sub is None:
            continue
        below = _inside(-(sub.b + 1.0), ew)
        _paint(sub.hu, H["bone"] * 0.5, _inside(air.sd(sub.x, sub.y, sub.z) + 1.5, ew) * below)
        _paint(sub.hu, H["sinus"], _inside(air.sd(sub.x, sub.y, sub.z), ew) * below)


# ============================================================================================
# Into the scanner: rotate, partial-volume slices, noise
# ============================================================================================

def _place_in_scanner(hu: np.ndarray, bits: np.ndarray, grid: _Grid, scan: _Scan,
                      anat: _Anatomy) -> tuple[np.ndarray, np.ndarray]:
    """Resample the head-frame render onto the axial slices: HU averaged over the sub-slices of
    each slice (partial volume), lesion bits OR-ed over them (a lesion in any part of a thick slice
    is in that slice). Slab by slab, each cropped to the head's outline there: less to resample,
    and buffers small enough to be reused."""
    out = np.full((scan.n_slices, scan.size, scan.size), _AIR, dtype=np.float32)
    out_bits = np.zeros(out.shape, dtype=np.uint8)
    hu_image = _grid_image(hu, grid, scan)
    lesion_box = _nonzero_box(bits, grid)
    bits_image = _grid_image(bits, grid, scan) if lesion_box is not None else None
    lesion_rows = _output_box(*lesion_box, scan) if lesion_box is not None else None
    outline = _head_outline(anat, scan)
    per_slab = max(1, int(4e6 // (scan.sub_slices * scan.size * scan.size * 0.5)))
    for k0 in range(0, scan.n_slices, per_slab):
        k1 = min(scan.n_slices, k0 + per_slab)
        box = _slab_box(outline, scan, k0, k1)
        if box is None:
            continue
        _resample_into(out, hu_image, scan, (k0, k1), box, sitk.sitkLinear, _AIR, _mean_of_sub_slices)
        if lesion_rows is not None:
            both = _intersect(box, lesion_rows)
            if both is not None:
                _resample_into(out_bits, bits_image, scan, (k0, k1), both, sitk.sitkNearestNeighbor, 0,
                               _or_of_sub_slices)
    return out, out_bits


def _head_outline(anat: _Anatomy, scan: _Scan) -> np.ndarray:
    """Points on (just outside) the skin, in scanner mm: bounds the head in any slab."""
    return scan.centre + _head_outline_local(anat, margin=3.0) @ scan.rotation.T


def _head_outline_local(anat: _Anatomy, margin: float, n: int = 4000) -> np.ndarray:
    """n points spread evenly over the head ellipsoid grown by `margin` mm, head-local (Fibonacci sphere)."""
    i = np.arange(n) + 0.5
    zu = 1.0 - 2.0 * i / n
    r = np.sqrt(1.0 - zu * zu)
    ang = math.pi * (3.0 - math.sqrt(5.0)) * i
    semi_x = anat.a * (1 + anat.egg + abs(anat.asym)) + margin
    return np.stack([r * np.cos(ang) * semi_x, r * np.sin(ang) * (anat.b + margin),
                     zu * np.where(zu > 0, anat.c + margin, anat.c_down + margin)], axis=1)


def _slab_box(outline: np.ndarray, scan: _Scan, k0: int, k1: int):
    """Row and column ranges of slices k0..k1-1 that the head can reach, or None."""
    z0 = scan.origin[2] + (k0 - 0.5) * scan.thickness - 8.0
    z1 = scan.origin[2] + (k1 - 0.5) * scan.thickness + 8.0
    pts = outline[(outline[:, 2] >= z0) & (outline[:, 2] <= z1)]
    if len(pts) == 0:
        return None
    return _pixel_ranges(pts, scan)


def _pixel_ranges(pts: np.ndarray, scan: _Scan):
    ranges = []
    for axis in (1, 0):
        a0 = int(math.floor((pts[:, axis].min() - scan.origin[axis]) / scan.pixel)) - 1
        a1 = int(math.ceil((pts[:, axis].max() - scan.origin[axis]) / scan.pixel)) + 2
        a0, a1 = max(0, a0), min(scan.size, a1)
        if a1 <= a0:
            return None
        ranges.append((a0, a1))
    return tuple(ranges)


def _intersect(a, b):
    out = tuple((max(p[0], q[0]), min(p[1], q[1])) for p, q in zip(a, b))
    return out if all(r[1] > r[0] for r in out) else None


def _resample_into(out: np.ndarray, src: sitk.Image, scan: _Scan, slices: tuple[int, int], box, interp,
                   default, reduce) -> None:
    (j0, j1), (i0, i1) = box
    k0, k1 = slices
    image = _resample(src, scan, (i0, j0, k0), (i1 - i0, j1 - j0, k1 - k0), interp, default)
    fine = sitk.GetArrayViewFromImage(image)            # valid while `image` lives
    out[k0:k1, j0:j1, i0:i1] = reduce(fine.reshape(k1 - k0, scan.sub_slices, j1 - j0, i1 - i0))


def _mean_of_sub_slices(fine: np.ndarray) -> np.ndarray:
    if fine.shape[1] == 1:
        return fine[:, 0]
    acc = fine[:, 0].copy()
    for i in range(1, fine.shape[1]):
        acc += fine[:, i]
    acc *= 1.0 / fine.shape[1]
    return acc


def _or_of_sub_slices(fine: np.ndarray) -> np.ndarray:
    return fine[:, 0] if fine.shape[1] == 1 else np.bitwise_or.reduce(fine, axis=1)


def _nonzero_box(bits: np.ndarray, grid: _Grid):
    """Local (lo, hi) corners of the voxels where any lesion bit is set, or None."""
    idx = [np.nonzero(bits.any(axis=axes))[0] for axes in ((0, 1), (0, 2), (1, 2))]   # x, y, z
    if idx[0].size == 0:
        return None
    lo = np.asarray(grid.origin) + grid.h * (np.array([i[0] for i in idx]) - 1)
    hi = np.asarray(grid.origin) + grid.h * (np.array([i[-1] for i in idx]) + 1)
    return lo, hi


def _grid_image(arr: np.ndarray, grid: _Grid, scan: _Scan) -> sitk.Image:
    img = sitk.GetImageFromArray(arr)
    img.SetSpacing((grid.h,) * 3)
    img.SetOrigin(_f3(scan.centre + scan.rotation @ np.asarray(grid.origin)))
    img.SetDirection(scan.rotation.flatten().tolist())
    return img


def _output_box(lo: np.ndarray, hi: np.ndarray, scan: _Scan):
    """Row and column ranges of the output slices that the local box [lo, hi] can reach."""
    corners = np.array([[x, y, z] for x in (lo[0], hi[0]) for y in (lo[1], hi[1]) for z in (lo[2], hi[2])])
    return _pixel_ranges(scan.centre + corners @ scan.rotation.T, scan)


def _resample(src: sitk.Image, scan: _Scan, start: tuple[int, int, int], size: tuple[int, int, int], interp,
              default) -> sitk.Image:
    """Onto output columns/rows/slices [start, start + size), every slice as its sub-slices."""
    m = scan.sub_slices
    dz = scan.thickness / m
    f = sitk.ResampleImageFilter()
    f.SetSize((int(size[0]), int(size[1]), int(size[2]) * m))
    f.SetOutputSpacing((scan.pixel, scan.pixel, dz))
    f.SetOutputOrigin((scan.origin[0] + start[0] * scan.pixel, scan.origin[1] + start[1] * scan.pixel,
                       scan.origin[2] + start[2] * scan.thickness - scan.thickness / 2 + dz / 2))
    f.SetInterpolator(interp)
    f.SetDefaultPixelValue(float(default))
    return f.Execute(src)


def _add_headrest(array: np.ndarray, scan: _Scan) -> None:
    hr = scan.headrest
    if hr is None:
        return
    coords = scan.origin[0] + scan.pixel * np.arange(scan.size, dtype=np.float32)
    ycoords = scan.origin[1] + scan.pixel * np.arange(scan.size, dtype=np.float32)
    y0 = hr["y"] + 0.35 * hr["radius"]
    rows = np.nonzero(ycoords > y0)[0]
    if rows.size == 0:
        return
    yy = ycoords[rows][:, None]
    r = np.sqrt((coords[None, :] - hr["x"]) ** 2 + (yy - hr["y"]) ** 2)
    ew = max(scan.pixel, 0.8)
    alpha = _inside(0.5 * hr["thickness"] - np.abs(r - hr["radius"]), ew) * _inside(yy - y0, ew)
    sl = array[:, rows[0]:rows[-1] + 1, :]
    _paint(sl, hr["hu"], alpha[None])


def _add_noise_and_circle(array: np.ndarray, scan: _Scan, rng: np.random.Generator) -> None:
    """Noise with the in-plane correlation of the kernel, then padding outside the scan circle.

    Slab by slab so the noise stays in cache; a 3-tap filter per axis matches the kernel's
    variance, and the white noise is scaled so the filtered noise has the sampled SD.
    """
    sigma_px = scan.kernel_fwhm / 2.355 / scan.pixel
    k = min(0.25, 0.5 * sigma_px ** 2)
    gain = (1.0 - 2 * k) ** 2 + 2 * k * k          # variance kept by one 3-tap pass
    amp = scan.noise_hu / gain if k > 0.02 else scan.noise_hu
    for z0 in range(0, array.shape[0], 8):
        slab = array[z0:z0 + 8]
        noise = rng.standard_normal(slab.shape, dtype=np.float32)
        if k > 0.02:
            for axis in (1, 2):
                _smooth3(noise, axis, k)
        noise *= amp
        slab += noise
    yy, xx = np.meshgrid(scan.origin[1] + scan.pixel * np.arange(scan.size),
                         scan.origin[0] + scan.pixel * np.arange(scan.size), indexing="ij")
    outside = (xx ** 2 + yy ** 2) > (scan.fov / 2) ** 2
    np.rint(array, out=array)
    if outside.any():
        array[:, outside] = scan.background


def _smooth3(a: np.ndarray, axis: int, k: float) -> None:
    """In place [k, 1-2k, k] along one axis (edges keep their value)."""
    lo = [slice(None)] * 3
    hi = [slice(None)] * 3
    mid = [slice(None)] * 3
    lo[axis], mid[axis], hi[axis] = slice(0, -2), slice(1, -1), slice(2, None)
    side = a[tuple(lo)] + a[tuple(hi)]
    side *= k
    centre = a[tuple(mid)]
    centre *= 1.0 - 2 * k
    centre += side


# ============================================================================================
# Ground truth and records
# ============================================================================================

def _masks_and_labels(out_bits: np.ndarray, scene: _Scene) -> tuple[dict[str, np.ndarray], dict[str, int]]:
    """Labels from the plan; masks decoded from the lesion bits (only inside their bounding box)."""
    plan = scene.plan
    labels = {t: 0 for t in TASKS}
    selections: dict[str, int] = {}
    for name, bit in _LESION_BIT.items():
        if name in plan.findings:
            labels[name] = 1
            selections[name] = bit
    hemorrhages = [t for t in HEMORRHAGE_TYPES if labels[t]]
    if hemorrhages:
        labels["any_hemorrhage"] = 1
        selections["any_hemorrhage"] = sum(_LESION_BIT[t] for t in hemorrhages)
    if plan.cause is not None:
        labels["mass_effect"] = 1
        selections["mass_effect"] = _MIDLINE_BIT | _LESION_BIT[plan.cause]
        if plan.shift_mm >= 5.0:
            labels["midline_shift"] = 1
            selections["midline_shift"] = selections["mass_effect"]
    where = np.flatnonzero(out_bits)            # lesions are a few percent of the volume
    values = out_bits.ravel()[where]
    masks = {}
    for name, bits in selections.items():
        mask = np.zeros(out_bits.shape, dtype=bool)
        mask.ravel()[where[(values & bits) != 0]] = True
        masks[name] = mask
    return masks, labels


def _info(seed: int, anatomy_name: str, anat: _Anatomy, scan: _Scan, scene: _Scene, labels: dict[str, int]) -> dict:
    lesions = {}
    for name, info in scene.lesion_info.items():
        entry = dict(info)
        local = entry.pop("centre_local_mm", None)
        if local is not None:
            entry["centre_mm"] = [round(float(v), 2) for v in scan.centre + scan.rotation @ np.asarray(local)]
        lesions[name] = _jsonable(entry, ndigits=2)
    return _jsonable({
        "seed": int(seed), "anatomy": anatomy_name, "findings": sorted(t for t, v in labels.items() if v),
        "slice_thickness_mm": scan.thickness, "spacing_mm": list(scan.spacing), "shape_zyx": [scan.n_slices, scan.size, scan.size],
        "in_plane_size": scan.size, "fov_mm": scan.fov, "shift_mm": round(scene.plan.shift_mm, 2),
        "shift_direction": "right" if scene.shift < 0 else "left" if scene.shift > 0 else None,
        "mass_effect_cause": scene.plan.cause, "noise_hu": round(scan.noise_hu, 2), "kernel_fwhm_mm": round(scan.kernel_fwhm, 2),
        "rotation_deg": [round(v, 2) for v in anat.rotation], "head_centre_mm": [round(float(v), 2) for v in scan.centre],
        "head_semi_axes_mm": [round(v, 1) for v in (anat.a, anat.b, anat.c)], "atrophy": round(anat.atrophy, 3),
        "ventricle_scale": round(anat.vent_scale, 3), "skull_thickness_mm": round(anat.skull_t, 2),
        "grey_white_hu": [round(anat.hu["gm"], 1), round(anat.hu["wm"], 1)], "headrest": scan.headrest is not None,
        "lesions": lesions,
    })


def _jsonable(obj, ndigits: int | None = None):
    if isinstance(obj, dict):
        return {str(k): _jsonable(v, ndigits) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v, ndigits) for v in obj]
    if isinstance(obj, (np.floating, float)):
        return float(obj) if ndigits is None else round(float(obj), ndigits)
    if isinstance(obj, (np.integer,)):
        return int(obj)
    return obj


def _write_case(case_dir: Path, case_id: str, ph: Phantom, fmt: str, case_seed: int) -> str:
    from fmct.io import write_volume

    case_dir.mkdir(parents=True, exist_ok=True)
    if fmt == "dicom":
        from fmct.dicom import write_dicom_series

        write_dicom_series(ph.volume, case_dir / "ct", series_description=f"FMCT phantom {case_id}",
                           shuffle_names_seed=case_seed)
        rel = "ct"
    else:
        write_volume(ph.volume, case_dir / "ct.nii.gz")
        rel = "ct.nii.gz"
    for task, mask in ph.masks.items():
        write_volume(ph.volume.with_array(mask.astype(np.uint8)), case_dir / f"mask_{task}.nii.gz")
    (case_dir / "info.json").write_text(json.dumps(ph.info, indent=1))
    return rel


def _write_labels_csv(path: Path, rows: list[dict]) -> None:
    columns = ["case_id", "path", *TASKS, "slice_thickness_mm", "anatomy"]
    with open(path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
