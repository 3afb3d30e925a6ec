"""What a real scanner adds on top of the anatomy: a head rest, noise with the in-plane correlation
of the reconstruction kernel, rounding to integer HU, and padding outside the reconstruction circle.

These come last, on the output slices, so they are the same whatever the anatomy and findings.
"""
from __future__ import annotations

import numpy as np

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
