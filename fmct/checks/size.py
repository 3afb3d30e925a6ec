"""A plausible physical size for the spacing in the header: the cranial cavity of an adult head.

The cavity's largest axial section (inner table of the skull) measures about 115-145 mm left-right
and 145-185 mm front-back in adults; its area scales with the square of an in-plane spacing error, so
a header spacing x0.7 or x1.5 moves it far outside the human range while real heads stay inside.
Its height from the posterior fossa's floor to the vertex (about 110-150 mm) tells a whole head from
a partial scan and a body part read as a head from a head.
"""
from __future__ import annotations

import math

from fmct.checks.result import Check
from fmct.checks.sample import Sample
from fmct.checks.skull import Skull

AREA_MM2 = (10500.0, 26000.0)  # largest cavity section; an equivalent diameter of 116-182 mm
HEIGHT_MM = (70.0, 200.0)  # cavity floor to vertex (a vertex-only scan measures 35-55)
NAME = "plausible head size"


def check_size(skull: Skull, sample: Sample, cut: bool) -> Check:
    """Refuses a cranial cavity too small, too large, too short or too tall for an adult head at this spacing."""
    if not skull.found:
        return Check(NAME, True, None, None, "not judged (no head found)")
    top = max(skull.slices, key=lambda s: s.area)
    height = skull.height_mm(sample)
    value = {"cavity_area_mm2": round(top.area), "equivalent_diameter_mm": round(math.sqrt(4 * top.area / math.pi), 1),
             "breadth_mm": round(top.width, 1), "length_mm": round(top.length, 1), "height_mm": round(height, 1)}
    limit = {"cavity_area_mm2": list(AREA_MM2), "height_mm": list(HEIGHT_MM)}
    measured = (f"cranial cavity {top.width:.0f} mm wide, {top.length:.0f} mm long ({top.area / 100:.0f} cm^2) and "
                f"{height:.0f} mm high")
    problems = []
    if not cut and not AREA_MM2[0] <= top.area <= AREA_MM2[1]:
        problems.append("too small" if top.area < AREA_MM2[0] else "too large")
    if height < HEIGHT_MM[0]:
        problems.append("too short from bottom to top (a partial scan, or a child's head)")
    elif height > HEIGHT_MM[1]:
        problems.append("too tall")
    if problems:
        return Check(NAME, False, value, limit,
                     f"{measured}: {' and '.join(problems)} for an adult head at the header's voxel spacing "
                     f"{' x '.join(f'{s:g}' for s in _spacing(sample))} mm. Check the spacing in the header (pixel "
                     "spacing, slice thickness), and that the scan covers the whole head.")
    note = " (area not judged: the head is cut by the field of view)" if cut else ""
    return Check(NAME, True, value, limit, measured + note)


def _spacing(sample: Sample) -> tuple[float, ...]:
    return tuple(round(s / n, 4) for s, n in zip(sample.spacing, sample.steps))
