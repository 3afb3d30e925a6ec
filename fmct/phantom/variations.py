"""The same head scanned otherwise: pose, field of view, kernel, noise, slices, contrast, head size.

Each function takes a CT Volume and returns another one of the same patient as a different scan (or
patient) would show it. Benchmarks use them to measure how far the answer moves
(benchmarks/bench_robustness.py) and whether the out-of-distribution guard notices
(benchmarks/bench_ood.py, Testing/test_ood.py); they apply to any CT, not only phantoms.
"""
from __future__ import annotations

import math

import numpy as np
import SimpleITK as sitk

from fmct.reading.volume import Volume

AIR = -1024.0


def rigid(volume: Volume, angle_deg: float, axis: np.ndarray, shift_mm: np.ndarray) -> Volume:
    """The head turned by angle_deg about axis through the grid's centre and moved by shift_mm, same grid."""
    image = volume.to_sitk()
    transform = sitk.VersorRigid3DTransform()
    transform.SetCenter(_centre(image))
    transform.SetRotation(tuple(np.asarray(axis, float) / np.linalg.norm(axis)), math.radians(angle_deg))
    transform.SetTranslation(tuple(float(s) for s in shift_mm))
    moved = sitk.Resample(image, image, transform.GetInverse(), sitk.sitkLinear, AIR, sitk.sitkFloat32)
    return Volume.from_sitk(moved, volume.meta)


def scaled(volume: Volume, factor: float) -> Volume:
    """The head `factor` times its size about the grid's centre (0.5: an infant-sized head), same grid."""
    image = volume.to_sitk()
    transform = sitk.ScaleTransform(3, (1.0 / factor,) * 3)
    transform.SetCenter(_centre(image))
    return Volume.from_sitk(sitk.Resample(image, image, transform, sitk.sitkLinear, AIR, sitk.sitkFloat32), volume.meta)


def cut(volume: Volume, superior_mm: float = 0.0, inferior_mm: float = 0.0) -> Volume:
    """Slices removed at the top (vertex) or bottom (neck) of an axial volume (k pointing superior)."""
    dz = volume.spacing[2]
    lo, hi = int(round(inferior_mm / dz)), volume.array.shape[0] - int(round(superior_mm / dz))
    origin = np.asarray(volume.origin) + volume.direction[:, 2] * dz * lo
    return Volume(volume.array[lo:hi].copy(), volume.spacing, origin, volume.direction, volume.meta)


def vertex_only(volume: Volume, keep: float = 0.35) -> Volume:
    """Only the top `keep` share of the slices: a scan that missed most of the head."""
    return cut(volume, inferior_mm=volume.spacing[2] * int(volume.array.shape[0] * (1.0 - keep)))


def kernel(volume: Volume, sigma_mm: float, sharpen: float = 0.0) -> Volume:
    """A smoother reconstruction kernel (Gaussian), or a sharper one (unsharp mask with that Gaussian)."""
    blurred = sitk.GetArrayFromImage(sitk.SmoothingRecursiveGaussian(volume.to_sitk(), sigma_mm))
    array = volume.array + sharpen * (volume.array - blurred) if sharpen else blurred
    return volume.with_array(np.asarray(array, np.float32))


def noise(volume: Volume, sigma_hu: float, rng: np.random.Generator) -> Volume:
    """More quantum noise (white, sigma_hu)."""
    return volume.with_array((volume.array + rng.normal(0, sigma_hu, volume.array.shape)).astype(np.float32))


def thicker_slices(volume: Volume, factor: int) -> Volume:
    """Slices `factor` times thicker: adjacent slices averaged, as a thicker reconstruction would."""
    n = volume.array.shape[0] // factor * factor
    array = volume.array[:n].reshape(n // factor, factor, *volume.array.shape[1:]).mean(1)
    dz = volume.spacing[2]
    origin = np.asarray(volume.origin) + volume.direction[:, 2] * dz * (factor - 1) / 2
    return Volume(array.astype(np.float32), (volume.spacing[0], volume.spacing[1], dz * factor), origin,
                  volume.direction, volume.meta)


def contrast_enhanced(volume: Volume, enhancement_hu: float = 45.0) -> Volume:
    """Brain tissue (15-60 HU) brightened as after iodinated contrast: what a non-contrast model never saw."""
    array = volume.array.astype(np.float32, copy=True)
    array[(array > 15) & (array < 60)] += enhancement_hu
    return volume.with_array(array)


def _centre(image: sitk.Image) -> tuple[float, ...]:
    return image.TransformContinuousIndexToPhysicalPoint([(n - 1) / 2 for n in image.GetSize()])
