"""Orientation from anatomy against the header: the skull base is inferior and its deepest part (the posterior
fossa) posterior; the vertex is a dome at the top.

Through the head, the centre of the cranial cavity's axial section stays over the middle from the
equator to the vertex, and moves back by 2-4 cm in its lowest slices, where only the posterior fossa
is left (the anterior fossa's floor lies higher). In the header's patient frame (LPS) that shift must
be at the inferior end of the cavity and point posterior. A head stored upside down has it at the
top; prone under a supine header (or turned 180 degrees in-plane), it points anterior; turned 90
degrees, it points to a side. When neither end shows a clear shift, orientation is not judged.
"""
from __future__ import annotations

import numpy as np

from fmct.checks.result import Check
from fmct.checks.sample import Sample
from fmct.checks.skull import SliceRecord, Skull

END_MM = 30.0  # the part of the cavity at each end whose centre is compared with the equator's
MIN_SHIFT_MM = 7.0  # a shift this long is clear anatomy (phantoms: 5-30 mm at the base, at most 8.4 at the vertex)
DOMINANCE = 2.0  # the skull base's end shifts at least this many times more than the vertex's
MAX_ANGLE_DEG = 45.0  # the shift must point within this of posterior
NAME = "orientation"


def check_orientation(skull: Skull, sample: Sample, cut: bool = False) -> Check:
    """Refuses a head whose anatomy disagrees with the header's orientation; passes when it cannot be told
    (no head, or a head cut by the field of view, whose cavity centres move with the cut)."""
    if not skull.found or len(skull.slices) < 4:
        return Check(NAME, True, None, None, "not judged (no head found)")
    if cut:
        return Check(NAME, True, None, None, "not judged (the head is cut by the field of view)")
    low, high = skull.z_range_mm(sample)
    centre = _centre(skull.widest())
    z = sample.z_mm(np.array([s.k for s in skull.slices]))
    bottom = _centre([s for s, zz in zip(skull.slices, z) if zz <= low + END_MM]) - centre
    top = _centre([s for s, zz in zip(skull.slices, z) if zz >= high - END_MM]) - centre
    nb, nt = float(np.hypot(*bottom)), float(np.hypot(*top))
    angle = float(np.degrees(np.arctan2(abs(bottom[0]), bottom[1])))  # 0: posterior, 180: anterior
    value = {"base_shift_mm": [round(float(v), 1) for v in bottom], "vertex_shift_mm": [round(float(v), 1) for v in top],
             "base_shift_angle_from_posterior_deg": round(angle, 1)}
    limit = {"min_shift_mm": MIN_SHIFT_MM, "max_angle_deg": MAX_ANGLE_DEG}
    todo = (" The image does not match its header: fix the orientation in the header (or re-export from the "
            "scanner); fmct does not guess.")
    if nt >= MIN_SHIFT_MM and nt > DOMINANCE * nb:
        return Check(NAME, False, value, limit,
                     f"the skull base (the cavity's off-centre, posterior fossa end) is at the header's superior end "
                     f"and the vertex at its inferior end: the head is stored upside down.{todo}")
    if nb < MIN_SHIFT_MM:
        return Check(NAME, True, value, limit, "not judged (no clear skull base in the scan)")
    if angle > 180.0 - MAX_ANGLE_DEG:
        return Check(NAME, False, value, limit,
                     "the posterior fossa lies anterior by the header: the face points posterior (a prone patient "
                     f"under a supine header, or the image turned 180 degrees in-plane).{todo}")
    if angle > MAX_ANGLE_DEG:
        side = "left" if bottom[0] > 0 else "right"
        return Check(NAME, False, value, limit,
                     f"the posterior fossa lies to the patient's {side} by the header: the image is turned about 90 "
                     f"degrees in-plane.{todo}")
    return Check(NAME, True, value, limit, "skull base inferior and posterior, vertex superior, as the header says")


def _centre(records: list[SliceRecord]) -> np.ndarray:
    weights = np.array([r.area for r in records])
    return (np.array([r.centroid for r in records]) * weights[:, None]).sum(0) / weights.sum()
