"""One sampled head: sizes, layer thicknesses, tissue HU, gyral pattern and pose, drawn from an
`AnatomySettings`, plus the landmark surfaces derived from them (skull base, corpus callosum,
head outline).

Everything is in the head-local frame (mm, origin at the brain centre, x = patient left,
y = posterior, z = superior); landmarks are given for a reference head and scaled to this one.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

from fmct.phantom.common import _f3, _u, _unit
from fmct.phantom.settings import AnatomySettings


class _Sutures(NamedTuple):
    """Where the coronal and lambdoid sutures lie and how they look (see `_suture_planes`)."""

    coronal_mm: float      # offset of the coronal suture from the reference head's
    lambdoid_mm: float     # offset of the lambdoid suture
    zigzag_mm: float       # zigzag amplitude
    wave: float            # zigzag wave number, rad/mm
    phase_x: float
    phase_z: float
    width_mm: float        # gap width
    open: float            # how unfused: share of soft tissue in the gap


class _Mastoid(NamedTuple):
    """The air-cell pattern of both pneumatised mastoids: a thresholded sum of cosines."""

    wave: float            # rad/mm
    phase_x: float
    phase_y: float
    threshold: float


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
    # drawn after all of the above (issue #12 item 3), so the rest of a head does not depend on them
    sutures: "_Sutures | None" = None
    edh_sutures: bool = False
    mastoid: "_Mastoid | None" = None  # None: not pneumatised
    tentorium: bool = False
    dural_sdh_prob: float = 0.0        # share of small subdurals on the falx or the tentorium


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
    anat = _Anatomy(
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
    return _sample_realism(rng, s, anat)


def _sample_realism(rng: np.random.Generator, s: AnatomySettings, anat: _Anatomy) -> _Anatomy:
    """Sutures, mastoid air cells, tentorium: drawn last, so the other parameters of a seed stay as they were."""
    sut = _Sutures(_u(rng, (-5.0, 5.0)), _u(rng, (-5.0, 5.0)), _u(rng, (0.6, 1.6)), 2 * math.pi / _u(rng, (5.0, 9.0)),
                   _u(rng, (0, 2 * math.pi)), _u(rng, (0, 2 * math.pi)), _u(rng, (0.5, 1.2)), _u(rng, s.suture_open))
    anat.sutures = sut if s.sutures else None
    anat.edh_sutures = bool(s.edh_limited_by_sutures)
    mastoid = _Mastoid(2 * math.pi / _u(rng, (3.5, 6.0)), _u(rng, (0, 2 * math.pi)), _u(rng, (0, 2 * math.pi)),
                       _u(rng, (0.2, 0.9)))
    anat.mastoid = mastoid if rng.random() < s.mastoid_prob else None
    anat.tentorium = bool(s.tentorium)
    anat.dural_sdh_prob = float(s.dural_subdural_prob)
    return anat


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


def _suture_planes(anat: _Anatomy, x: np.ndarray, y: np.ndarray, z: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Signed distances (mm, approximately) to the coronal and lambdoid suture surfaces, zigzag included.

    Coronal: > 0 behind it (parietal side); it runs from bregma (0, -20, 75) down to the pterion
    (+-60, -35, 0) of the reference head. Lambdoid: > 0 behind it (occipital side), from lambda
    (0, 70, 50) down to the asterion (+-50, 55, -25). Both are planes tilted forward at the top, so
    on the skull they run lower at the sides, as the real ones do. The sagittal suture is x = 0
    between the two.
    """
    _, sy, sz = anat.sc
    su = anat.sutures
    zig = su.zigzag_mm * (np.sin(x * su.wave + su.phase_x) + np.sin(z * su.wave + su.phase_z)) * 0.5
    norm = sy / math.sqrt(1.04)
    yr, zr = y * (1.0 / sy), z * (1.0 / sz)
    coronal = (yr - 0.2 * zr + (35.0 + su.coronal_mm)) * norm + zig
    lambdoid = (yr - 0.2 * zr - (60.0 + su.lambdoid_mm)) * norm + zig
    return coronal, lambdoid


def _sigmoid(t: np.ndarray) -> np.ndarray:
    return 0.5 + 0.5 * np.tanh(t)


def _tentorium_z(anat: _Anatomy, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Height (local z, mm) of the tentorium's mid-surface: highest at the incisura, sloping down
    backwards to the torcula and sideways to the petrous ridges."""
    sx, sy, sz = anat.sc
    return (-5.0 - 0.6 * np.maximum(y * (1.0 / sy) - 20.0, 0.0) - 0.5 * np.abs(x) * (1.0 / sx)) * sz


def _z_callosum(anat: _Anatomy, y: np.ndarray) -> np.ndarray:
    """Lower edge of the interhemispheric fissure: the corpus callosum, and deep in front and behind it."""
    sy, sz = anat.sc[1], anat.sc[2]
    yr = y / sy
    return np.where(np.abs(yr) < 36.0, (26.0 - 8.0 * (yr / 33.0) ** 2) * sz, -25.0 * sz).astype(np.float32)


def _head_outline_local(anat: _Anatomy, margin: float, n: int = 4000) -> np.ndarray:
    """n points spread evenly over the head ellipsoid grown by `margin` mm, head-local (Fibonacci sphere)."""
    i = np.arange(n) + 0.5
    zu = 1.0 - 2.0 * i / n
    r = np.sqrt(1.0 - zu * zu)
    ang = math.pi * (3.0 - math.sqrt(5.0)) * i
    semi_x = anat.a * (1 + anat.egg + abs(anat.asym)) + margin
    return np.stack([r * np.cos(ang) * semi_x, r * np.sin(ang) * (anat.b + margin),
                     zu * np.where(zu > 0, anat.c + margin, anat.c_down + margin)], axis=1)
