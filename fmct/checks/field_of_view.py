"""The head lies inside the field of view: a skull cut by the reconstruction's edge is flagged, with the share of
its outline that is missing.

The outline is an ellipse fitted (Fitzgibbon's direct least-squares fit) to the inner table of the skull
at its widest level; the share of that ellipse outside the image or on padding is what the scan missed.
A flag, not a refusal: the rest of the head may still be worth a look, but never "in distribution".
"""
from __future__ import annotations

import numpy as np

from fmct.checks.result import Check
from fmct.checks.sample import Sample
from fmct.checks.skull import Skull

MAX_MISSING = 0.02  # share of the skull outline allowed outside the field of view
NAME = "head inside the field of view"


def check_field_of_view(skull: Skull, sample: Sample) -> Check:
    if not skull.found:
        return Check(NAME, True, None, MAX_MISSING, "not judged (no head found)", refuses=False)
    widest = skull.widest()
    points = np.concatenate([s.boundary for s in widest])
    missing = _missing_share(points, sample, widest[0].k) if len(points) >= 6 else 0.0
    touching = sum(s.cut for s in skull.slices)
    value = {"missing_outline_share": round(missing, 3), "cut_edge_voxels": int(touching)}
    if missing <= MAX_MISSING and touching == 0:
        return Check(NAME, True, value, MAX_MISSING, "the whole skull outline is inside the image", refuses=False)
    return Check(NAME, False, value, MAX_MISSING,
                 f"head cut by the field of view: about {100 * missing:.0f}% of the skull outline lies outside the "
                 "image; findings near the cut (and the model's confidence) are unreliable. Reconstruct with a "
                 "larger field of view.", refuses=False)


def _missing_share(points: np.ndarray, sample: Sample, k: int) -> float:
    """Share of the fitted ellipse outside the sampled image or on its padding (0 when no ellipse fits)."""
    ellipse = fit_ellipse(points)
    if ellipse is None:
        return 0.0
    t = np.linspace(0.0, 2 * np.pi, 360, endpoint=False)
    (cx, cy), (a, b), angle = ellipse
    x = cx + a * np.cos(t) * np.cos(angle) - b * np.sin(t) * np.sin(angle)
    y = cy + a * np.cos(t) * np.sin(angle) + b * np.sin(t) * np.cos(angle)
    i = np.round((x - sample.origin[0]) / sample.spacing[0]).astype(int)
    j = np.round((y - sample.origin[1]) / sample.spacing[1]).astype(int)
    ny, nx = sample.array.shape[1:]
    inside = (i >= 0) & (i < nx) & (j >= 0) & (j < ny)
    if sample.padding is not None:
        outside = sample.outside[k]
        inside[inside] &= ~outside[j[inside], i[inside]]
    return float(1.0 - inside.mean())


def fit_ellipse(points: np.ndarray) -> tuple[tuple[float, float], tuple[float, float], float] | None:
    """((cx, cy), (a, b), angle) of the least-squares ellipse through [n, 2] points (Fitzgibbon 1999), or None."""
    mean = points.mean(axis=0)
    scale = float(points.std()) or 1.0
    x, y = ((points - mean) / scale).T
    d1 = np.stack([x * x, x * y, y * y], axis=1)
    d2 = np.stack([x, y, np.ones_like(x)], axis=1)
    s1, s2, s3 = d1.T @ d1, d1.T @ d2, d2.T @ d2
    try:
        t = -np.linalg.solve(s3, s2.T)
    except np.linalg.LinAlgError:
        return None
    m = s1 + s2 @ t
    m = np.array([m[2] / 2, -m[1], m[0] / 2])
    values, vectors = np.linalg.eig(m)
    vectors = np.real(vectors)
    cond = 4 * vectors[0] * vectors[2] - vectors[1] ** 2
    if not np.any(cond > 0):
        return None
    a1 = vectors[:, np.argmax(cond > 0)]
    a, bxy, c = a1
    d, e, f = t @ a1
    den = bxy * bxy - 4 * a * c
    if den >= 0:
        return None
    cx = (2 * c * d - bxy * e) / den
    cy = (2 * a * e - bxy * d) / den
    num = 2 * (a * e * e + c * d * d - bxy * d * e + den * f)
    root = np.sqrt((a - c) ** 2 + bxy * bxy)
    r1, r2 = num * (a + c + root), num * (a + c - root)
    if r1 <= 0 or r2 <= 0:
        return None
    r1, r2 = r1 / den ** 2, r2 / den ** 2
    angle = 0.5 * np.arctan2(-bxy, c - a)
    return ((float(cx * scale + mean[0]), float(cy * scale + mean[1])),
            (float(np.sqrt(r1) * scale), float(np.sqrt(r2) * scale)), float(angle))
