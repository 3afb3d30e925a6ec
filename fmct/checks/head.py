"""Is there a head, where is it, and is the scan more than a head (a head-and-neck or whole-body scan)?

In a larger scan the analysis is cropped to the head along the body's long axis, so that the
preprocessing centres on the head and not on the largest object (a trunk); the crop is recorded.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from fmct.checks.result import Check
from fmct.checks.sample import Sample
from fmct.checks.skull import Skull
from fmct.reading.volume import Volume

BELOW_KEEP_MM = 40.0  # kept below the cranial cavity's floor (skull base, upper neck) when cropping
ABOVE_KEEP_MM = 20.0  # kept above the vertex
CROP_BELOW_MM = 90.0  # a scan reaching this far below the cavity's floor is more than a head CT: crop
CROP_ABOVE_MM = 60.0
NAME = "head found"


@dataclass
class Crop:
    """The part of a larger scan analyzed: LPS z range (mm) and the slices kept along the array axis."""

    axis: int  # numpy axis of the Volume's array that runs closest to superior
    start: int
    stop: int
    z_mm: tuple[float, float]
    scan_z_mm: tuple[float, float]

    def to_dict(self) -> dict:
        return {"axis": self.axis, "slices": [self.start, self.stop], "z_mm": [round(z, 1) for z in self.z_mm],
                "scan_z_mm": [round(z, 1) for z in self.scan_z_mm]}

    def apply(self, volume: Volume) -> Volume:
        index = [slice(None)] * 3
        index[self.axis] = slice(self.start, self.stop)
        itk_axis = 2 - self.axis
        origin = np.asarray(volume.origin) + volume.direction[:, itk_axis] * volume.spacing[itk_axis] * self.start
        return Volume(volume.array[tuple(index)], volume.spacing, origin, volume.direction.copy(),
                      {**volume.meta, "cropped_to_head": self.to_dict()})


def check_head(skull: Skull, sample: Sample, volume: Volume) -> tuple[Check, Crop | None]:
    """Refuses when no cranium is found; otherwise says whether (and where) the scan is cropped to the head."""
    if not skull.found:
        return Check(NAME, False, None, "a closed bone ring around brain-density tissue",
                     "no head found: no slice shows a skull (a ring of bone above 250 HU) around tissue of brain "
                     "density. Give a CT of the head (the cranium from skull base to vertex)."), None
    low, high = skull.z_range_mm(sample)
    crop = head_crop(volume, low - BELOW_KEEP_MM, high + ABOVE_KEEP_MM, low - CROP_BELOW_MM, high + CROP_ABOVE_MM)
    value = {"cranial_slices": len(skull.slices), "cranium_z_mm": [round(low, 1), round(high, 1)],
             "cropped": crop is not None}
    if crop is None:
        return Check(NAME, True, value, "a closed bone ring around brain-density tissue",
                     f"cranium found from z {low:.0f} to {high:.0f} mm"), None
    value["crop"] = crop.to_dict()
    return Check(NAME, True, value, "a closed bone ring around brain-density tissue",
                 f"cranium found from z {low:.0f} to {high:.0f} mm in a scan covering {crop.scan_z_mm[0]:.0f} to "
                 f"{crop.scan_z_mm[1]:.0f} mm: analyzed the head only (z {crop.z_mm[0]:.0f} to {crop.z_mm[1]:.0f} mm)",
                 ), crop


def head_crop(volume: Volume, keep_low: float, keep_high: float, crop_low: float, crop_high: float) -> Crop | None:
    """A Crop to [keep_low, keep_high] mm (LPS z) when the scan reaches below crop_low or above crop_high, else None."""
    itk_axis = int(np.argmax(np.abs(volume.direction[2])))
    axis = 2 - itk_axis
    n = volume.array.shape[axis]
    step = volume.direction[2, itk_axis] * volume.spacing[itk_axis]
    z = volume.origin[2] + step * np.arange(n)
    scan = (float(z.min()), float(z.max()))
    if scan[0] >= crop_low and scan[1] <= crop_high:
        return None
    inside = np.nonzero((z >= keep_low) & (z <= keep_high))[0]
    if inside.size < 3:
        return None
    start, stop = int(inside.min()), int(inside.max()) + 1
    return Crop(axis, start, stop, (float(z[start:stop].min()), float(z[start:stop].max())), scan)
