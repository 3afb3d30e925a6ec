"""Rendering in the head frame: HU and lesion bits on the render grid, chunk by chunk.

Depth fields (below the skin, the inner table, above the skull base) and the CSF clefts are
computed once per chunk; tissues (sutures included), deep structures, the falx and tentorium, the
skull base (mastoids included) and the lesions are then painted from them, each only inside its
bounding box.
"""
from __future__ import annotations

import math

import numpy as np

from fmct.phantom.anatomy import _Anatomy, _ref, _suture_planes, _tentorium_z, _z_callosum, _z_floor
from fmct.phantom.common import _AIR, _f3
from fmct.phantom.draw import _Ellipsoid, _inside, _mark, _paint, _Tube
from fmct.phantom.findings import _MIDLINE_BIT
from fmct.phantom.grid import _Chunk, _Grid
from fmct.phantom.scene import _Scene
from fmct.phantom.sulci import _sulcal_cleft, _SulcalPattern

_CHUNK_VOXELS = 300_000     # per render chunk: temporaries stay in cache, per-chunk overheads stay small


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
    if an.sutures is not None:
        _paint_sutures(scene, ch, bone, ew)
    _paint(hu, H["csf"], _inside(f["di"], ew))
    e = f["e"]
    brain = H["wm"] + (H["gm"] - H["wm"]) * _inside(an.gm_t - e, ew)
    _paint(hu, brain, _inside(e, ew))


def _paint_sutures(scene: _Scene, ch: _Chunk, bone: np.ndarray, ew: float) -> None:
    """Coronal, lambdoid and sagittal sutures: thin zigzag gaps through the calvarium, partly fused.

    Evaluated only on the bone voxels of the chunk (a tenth of them), so they cost little.
    """
    an = scene.anat
    su = an.sutures
    where = np.nonzero(bone > 0.0)
    if where[0].size == 0:
        return
    x, y, z = ch.x.ravel()[where[2]], ch.y.ravel()[where[1]], ch.z.ravel()[where[0]]
    coronal, lambdoid = _suture_planes(an, x, y, z)
    sagittal = np.abs(x + 0.5 * su.zigzag_mm * np.sin(y * su.wave + su.phase_x))
    dist = np.minimum(np.abs(coronal), np.abs(lambdoid))
    np.minimum(dist, np.where((coronal > 0) & (lambdoid < 0), sagittal, np.float32(1e3)), out=dist)
    gap = _inside(0.5 * su.width_mm - dist, ew)
    gap *= bone[where]
    gap *= _inside(ch.f["b"][where] - an.base_t - 4.0, ew)   # the calvarium, not the skull base
    gap *= su.open
    hu = ch.hu[where]
    _paint(hu, an.hu["muscle"], gap)
    ch.hu[where] = hu


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
    if an.tentorium:
        _paint_tentorium(scene, ch, ew)
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


def _tentorium_sd(an: _Anatomy, x: np.ndarray, y: np.ndarray, z: np.ndarray) -> np.ndarray:
    """Signed distance (mm, > 0 inside) to the tentorium cerebelli, reference-head landmarks.

    A tent over the posterior fossa: highest at the incisura behind the midbrain, sloping down
    backwards to the torcula and sideways to the petrous ridges, open in front (the tentorial
    notch around the midbrain) and absent in front of the petrous ridges.
    """
    sx, sy, sz = an.sc
    ax_ = np.abs(x) * (1.0 / sx)
    yr = y * (1.0 / sy)
    sheet = 0.5 - np.abs(z - _tentorium_z(an, x, y)) * (1.0 / 1.22)   # about 1 mm thick across the slope
    behind = (yr - 0.55 * ax_ + 2.0) * sy                              # behind the petrous ridges
    notch = (np.sqrt((ax_ * (1.0 / 16.0)) ** 2 + ((yr - 8.0) * (1.0 / 30.0)) ** 2) - 1.0) * 16.0 * sx
    return np.minimum(np.minimum(sheet, behind), notch)


def _paint_tentorium(scene: _Scene, ch: _Chunk, ew: float) -> None:
    """The dense dural tent between the occipital lobes and the cerebellum."""
    an = scene.anat
    sx, sy, sz = an.sc
    dx = scene.displacement_box_dx()
    sub = ch.sub((-70.0 * sx - dx, -25.0 * sy, -65.0 * sz), (70.0 * sx + dx, 95.0 * sy, 0.0))
    if sub is None:
        return
    sd = _tentorium_sd(an, sub.xd, sub.y, sub.z)
    np.minimum(sd, sub.di, out=sd)
    _paint(sub.hu, an.hu["falx"], _inside(sd, ew * 0.75))


def _paint_mastoids(scene: _Scene, ch: _Chunk, ew: float) -> None:
    """Pneumatised mastoids behind the ear: bone honeycombed with air cells, below the posterior fossa."""
    an, H = scene.anat, scene.anat.hu
    m = an.mastoid
    for sgn in (1.0, -1.0):
        ell = _Ellipsoid(_ref(an, (sgn * 53, 36, -56)), _ref(an, (10, 13, 12)))
        sub = ch.sub(*ell.box(2.0))
        if sub is None:
            continue
        sd = ell.sd(sub.x, sub.y, sub.z)
        keep = _inside(sub.d - an.scalp_t, ew) * _inside(-(sub.b + 0.5 * an.base_t), ew)
        _paint(sub.hu, H["bone"], _inside(sd, ew) * keep)
        cells = np.cos(sub.x * m.wave + m.phase_x) + np.cos(sub.y * m.wave + m.phase_y) + np.cos(sub.z * m.wave)
        air = np.clip((cells - m.threshold) * 2.0, 0.0, 1.0) * _inside(sd - 1.5, ew) * keep
        _paint(sub.hu, H["sinus"], air)


def _paint_skull_base(scene: _Scene, ch: _Chunk, ew: float) -> None:
    """Petrous ridges, orbits (fat, globe, lens), sinus air under the anterior and middle fossae, mastoids."""
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
    if an.mastoid is not None:
        _paint_mastoids(scene, ch, ew)
