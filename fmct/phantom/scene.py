"""The scene: normal anatomy (ventricles, deep nuclei, cisterns) plus the planned lesions, as
structures with bounding boxes, and the midline shift that displaces them.

One object holds everything to draw for one phantom, so rendering needs no random draws of its own.
"""
from __future__ import annotations

import math

import numpy as np

from fmct.phantom.anatomy import _Anatomy, _ref
from fmct.phantom.common import _f3, _unit
from fmct.phantom.draw import _Ellipsoid, _Tube
from fmct.phantom.findings import _LESION_BIT, _Plan
from fmct.phantom.lesions import (
    _make_edh,
    _make_fracture,
    _make_iph,
    _make_ivh,
    _make_sah,
    _make_sdh,
)


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
