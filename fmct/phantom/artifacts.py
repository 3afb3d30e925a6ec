"""What a real scanner adds on top of the anatomy: a head rest, beam hardening at the skull base,
noise with the in-plane correlation of the reconstruction kernel, rounding to integer HU, and
padding outside the reconstruction circle.

These come last, on the output slices, so they are the same whatever the anatomy and findings.
"""
from __future__ import annotations

import math

import numpy as np

from fmct.phantom.anatomy import _Anatomy, _ref
from fmct.phantom.common import Range, _u
from fmct.phantom.draw import _inside, _paint
from fmct.phantom.scan import _Scan


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


def _add_beam_hardening(array: np.ndarray, scan: _Scan, anat: _Anatomy, rng: np.random.Generator,
                        prob: float, depth_hu: Range) -> dict | None:
    """The dark band between the petrous bones (Hounsfield bar) and a few streaks from them.

    Filtered back projection of rays hardened by both petrous bones under-estimates what lies
    between them; here a band along the line joining them, fading over about a centimetre above
    and below, and thin dark or bright streaks fanning out of one of them. Only soft tissue is
    changed (bone and air stay as they are), on the slices near the skull base. Returns what it drew.
    """
    if prob <= 0.0 or rng.random() >= prob:
        return None
    depth, width, height = _u(rng, depth_hu), _u(rng, (4.0, 9.0)), _u(rng, (6.0, 12.0))
    ends = [scan.centre + scan.rotation @ np.asarray(_ref(anat, (s * 30.0, 16.0, -47.0))) for s in (1.0, -1.0)]
    streaks = [(int(rng.integers(2)), _u(rng, (0, math.pi)), _u(rng, (-1.0, 0.4)) * depth) for _ in range(int(rng.integers(2, 5)))]
    zc = 0.5 * (ends[0][2] + ends[1][2])
    x = (scan.origin[0] + scan.pixel * np.arange(scan.size, dtype=np.float32))[None, :]
    y = (scan.origin[1] + scan.pixel * np.arange(scan.size, dtype=np.float32))[:, None]
    (ax_, ay), (bx, by) = ends[0][:2], ends[1][:2]
    ux, uy = bx - ax_, by - ay
    t = np.clip(((x - ax_) * ux + (y - ay) * uy) / (ux * ux + uy * uy), 0.0, 1.0)
    band = np.exp(-(((x - ax_ - t * ux) ** 2 + (y - ay - t * uy) ** 2) / width ** 2)) * -depth
    for end, angle, amp in streaks:
        ex, ey = ends[end][:2]
        along = (x - ex) * math.cos(angle) + (y - ey) * math.sin(angle)
        across = -(x - ex) * math.sin(angle) + (y - ey) * math.cos(angle)
        band += amp * np.exp(-across ** 2 - np.abs(along) * (1.0 / 40.0))
    band = band.astype(np.float32)
    z = scan.origin[2] + scan.thickness * np.arange(array.shape[0])
    for k in np.nonzero(np.abs(z - zc) < 2.5 * height)[0]:
        sl = array[k]
        soft = (sl > -200.0) & (sl < 300.0)
        sl += soft * band * np.float32(math.exp(-((z[k] - zc) / height) ** 2))
    return {"depth_hu": round(depth, 1), "streaks": len(streaks)}


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
