"""Lesions: intraparenchymal, subdural (convexity, falx, tentorium)/epidural, subarachnoid, intraventricular, fracture.

Each lesion knows its bounding box, how to draw itself on a `_Sub` (HU and its lesion bit), and
what to record in the phantom's info; its `_make_*` function places and sizes it in a scene.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from fmct.phantom.anatomy import _Anatomy, _ref, _suture_planes, _tentorium_z, _z_callosum
from fmct.phantom.common import Range, _f3, _u, _unit
from fmct.phantom.draw import _ellipsoid_sd, _inside, _mark, _paint
from fmct.phantom.findings import _LESION_BIT
from fmct.phantom.grid import _Sub
from fmct.phantom.sulci import _sulcal_cleft


class _Scene(Protocol):
    """What a lesion needs of the scene it is placed in (fmct.phantom.scene._Scene provides it):
    declared here so lesions depend on no scene module, and the scene composes lesions."""

    anat: _Anatomy
    gravity: tuple[float, float, float]
    ventricles: dict[str, object]
    lesion_info: dict[str, dict]

    def displacement_box_dx(self) -> float: ...

    def inner_table_point(self, direction) -> tuple[float, float, float]: ...

    def surface_point(self, direction, depth: float) -> tuple[float, float, float]: ...


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
        m = 1.0 + self.edema + sum(lump[2] for lump in self.lumps)
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
    sutures: tuple | None = None          # (anatomy, side of the coronal, side of the lambdoid): an epidural stops at both
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
        if self.sutures is not None:                            # so does the dura fixed at the sutures
            anat, side_c, side_l = self.sutures
            coronal, lambdoid = _suture_planes(anat, s.x, s.y, s.z)
            np.minimum(sd, side_c * coronal, out=sd)
            np.minimum(sd, side_l * lambdoid, out=sd)
        alpha = _inside(sd, ew)
        _paint(s.hu, self.hu, alpha)
        _mark(s.bits, _LESION_BIT[self.name], alpha)


def _convexity_direction(rng: np.random.Generator, side: float, lateral: Range, ap: Range, si: Range) -> np.ndarray:
    return _unit((side * _u(rng, lateral), _u(rng, ap), _u(rng, si)))


@dataclass
class _DuralSDH:
    """Subdural blood layering on one side of the falx (interhemispheric) or on one leaf of the tentorium.

    A thin lens on the dural sheet, thickest at its centre: `along` is its centre along the sheet
    (falx: y; tentorium: (x away from the midline, y)) and `extent` its half-length(s) there.
    """

    where: str                              # "falx" or "tentorium"
    anat: _Anatomy
    side: float
    along: tuple[float, ...]
    extent: tuple[float, ...]
    thickness: float
    hu: float
    reach: float                            # how far the midline may be displaced (mm): widens the box
    info: dict = field(default_factory=dict)

    def box(self):
        an, m = self.anat, self.thickness + self.reach + 4.0
        if self.where == "falx":
            return (-m - an.ihf_w, self.along[0] - self.extent[0] - 2, -30.0 * an.sc[2]), \
                   (m + an.ihf_w, self.along[0] + self.extent[0] + 2, an.c + 2)
        x0, y0 = self.along
        return (-(x0 + self.extent[0] + m), y0 - self.extent[1] - 2, -75.0 * an.sc[2]), \
               (x0 + self.extent[0] + m, y0 + self.extent[1] + 2, 5.0 * an.sc[2] + self.thickness)

    def paint(self, s: _Sub, ew: float) -> None:
        away = s.xd * self.side                                # > 0 on the lesion's side of the midline
        if self.where == "falx":
            prof = np.clip(1.0 - ((s.y - self.along[0]) * (1.0 / self.extent[0])) ** 2, 0.0, 1.0)
            depth = away - 0.5                                 # from the falx's surface outwards
            limit = s.z - (_z_callosum(self.anat, s.y) + 4.0 * self.anat.sc[2])   # above the callosum, as the falx
        else:
            u = (away - self.along[0]) * (1.0 / self.extent[0])
            v = (s.y - self.along[1]) * (1.0 / self.extent[1])
            prof = np.clip(1.0 - u * u - v * v, 0.0, 1.0)
            depth = s.z - _tentorium_z(self.anat, s.xd, s.y) - 0.6    # up from the tentorium's upper surface
            limit = away - 0.5
        np.sqrt(prof, out=prof)
        sd = np.minimum(np.minimum(depth, prof * self.thickness - depth), limit)
        sd = np.minimum(sd, s.di)
        alpha = _inside(sd, ew)
        _paint(s.hu, self.hu, alpha)
        _mark(s.bits, _LESION_BIT["subdural"], alpha)


def _make_dural_sdh(scene: _Scene, rng: np.random.Generator, side: float) -> _DuralSDH:
    an = scene.anat
    sx, sy, _ = an.sc
    hu = _u(rng, (50.0, 80.0))
    reach = scene.displacement_box_dx()
    if an.tentorium and rng.random() < 0.5:
        along = (_u(rng, (22.0, 40.0)) * sx, _u(rng, (35.0, 60.0)) * sy)
        extent = (_u(rng, (14.0, 24.0)) * sx, _u(rng, (18.0, 30.0)) * sy)
        lesion = _DuralSDH("tentorium", an, side, along, extent, _u(rng, (2.5, 5.0)), hu, reach)
    else:
        lesion = _DuralSDH("falx", an, side, (_u(rng, (-10.0, 50.0)) * sy,), (_u(rng, (25.0, 45.0)) * sy,),
                           _u(rng, (2.5, 6.0)), hu, reach)
    lesion.info = {"where": lesion.where, "thickness_mm": lesion.thickness, "hu": hu, "side": side,
                   "centre_along_mm": [float(a) for a in lesion.along], "extent_mm": [2 * float(e) for e in lesion.extent]}
    return lesion


def _make_sdh(scene: _Scene, rng: np.random.Generator, side: float, big: bool) -> "_ExtraAxial | _DuralSDH":
    if not big and scene.anat.dural_sdh_prob > 0 and rng.random() < scene.anat.dural_sdh_prob:
        return _make_dural_sdh(scene, rng, side)     # drawn only when on: other presets keep their voxels
    u = _convexity_direction(rng, side, (0.5, 1.0), (-0.8, 0.6), (-0.1, 0.8))
    thickness = _u(rng, (11.0, 19.0) if big else (5.0, 12.0))
    lesion = _extra_axial(scene, "subdural", u, side, thickness, _u(rng, (50.0, 80.0)), 0.3, _u(rng, (50.0, 80.0)))
    lesion.info["where"] = "convexity"
    return lesion


def _make_edh(scene: _Scene, rng: np.random.Generator, side: float, big: bool) -> _ExtraAxial:
    u = _convexity_direction(rng, side, (0.7, 1.0), (-0.5, 0.5), (-0.25, 0.5))
    thickness = _u(rng, (18.0, 28.0) if big else (10.0, 20.0))
    lesion = _extra_axial(scene, "epidural", u, side, thickness, _u(rng, (24.0, 36.0)), 0.5, _u(rng, (60.0, 90.0)))
    an = scene.anat
    if an.edh_sutures and an.sutures is not None:
        p = np.asarray(lesion.point, dtype=np.float32)
        coronal, lambdoid = _suture_planes(an, p[0], p[1], p[2])
        lesion.sutures = (an, 1.0 if coronal > 0 else -1.0, 1.0 if lambdoid > 0 else -1.0)
        lesion.info["bone"] = "frontal" if coronal < 0 else "occipital" if lambdoid > 0 else "parietal"
    return lesion


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
