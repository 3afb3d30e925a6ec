"""Find the head by its skull: the closed bone ring around brain-density tissue, slice by axial slice.

The largest object in a CT is not always the head (a trauma pan-scan holds a trunk); the cranium
is what no other body part has: in every axial slice between the skull base and the vertex, a ring
of bone encloses tissue of brain and CSF density. A slice counts as cranial when such a cavity is
found; the longest run of cranial slices is the head. Where the field of view cuts the head, the
cut edge closes the ring (the field-of-view check measures how much of the skull is missing).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import SimpleITK as sitk

from fmct.checks.sample import Sample

BONE_HU = 250.0  # cortical bone is > 1000 HU; thin bone (sinus walls, temporal squama) loses half to partial volume
TISSUE_HU = -300.0  # anything of the body, not air
BRAIN_HU = (-15.0, 100.0)  # brain, CSF and blood
MIN_CAVITY_MM2 = 800.0  # the smallest cranial cavity section counted (the vertex, the posterior fossa)
MAX_CAVITY_MM2 = 40000.0  # larger than any skull section: a body cavity, not a cranium
MIN_BRAIN_SHARE = 0.6  # of the cavity's voxels in BRAIN_HU
MAX_GAP_MM = 30.0  # cranial slices this far apart still belong to one head (a slice or two can miss the ring)
CLOSE_MM = 9.0  # gaps in the ring up to twice this are closed (sutures, foramina, thin temporal squama)
BRIDGE_MM = 4.5  # the wall is the bone grown by this much: a diagonal gap, which a closing leaves open, is bridged
MIN_BONE_COVER = 0.7  # share of the cavity's outline on bone: a skull, not a rib cage closed by the closing


@dataclass
class SliceRecord:
    """The cranial cavity in one axial slice of the sample (areas mm^2, positions LPS mm)."""

    k: int
    area: float
    centroid: tuple[float, float]
    width: float  # left-right extent of the cavity
    length: float  # anterior-posterior extent
    brain_share: float
    cut: int  # cavity-boundary voxels on the edge of the field of view
    boundary: np.ndarray  # [n, 2] (x, y) mm of the cavity's bony boundary


@dataclass
class Skull:
    """The head found in a Sample: its cranial slices (one run), or none."""

    slices: list[SliceRecord] = field(default_factory=list)

    @property
    def found(self) -> bool:
        return len(self.slices) > 0

    def z_range_mm(self, sample: Sample) -> tuple[float, float]:
        z = sample.z_mm(np.array([s.k for s in self.slices]))
        return float(z.min() - sample.spacing[2] / 2), float(z.max() + sample.spacing[2] / 2)

    def height_mm(self, sample: Sample) -> float:
        low, high = self.z_range_mm(sample)
        return high - low

    def widest(self, share: float = 0.8) -> list[SliceRecord]:
        """The slices whose cavity is at least `share` of the largest: the level of the skull's equator."""
        top = max(s.area for s in self.slices)
        return [s for s in self.slices if s.area >= share * top]


def find_skull(sample: Sample) -> Skull:
    """The longest run of cranial slices in the sample (an empty Skull when there is none)."""
    records = [r for k in range(sample.array.shape[0]) if (r := _cranial_slice(sample, k)) is not None]
    if not records:
        return Skull()
    runs, current = [], [records[0]]
    gap = max(1, int(round(MAX_GAP_MM / sample.spacing[2])))
    for r in records[1:]:
        if r.k - current[-1].k <= gap:
            current.append(r)
        else:
            runs.append(current)
            current = [r]
    runs.append(current)
    best = max(runs, key=lambda run: sum(r.area for r in run))
    return Skull(best)


def _cranial_slice(sample: Sample, k: int) -> SliceRecord | None:
    hu = sample.array[k]
    sx, sy = sample.spacing[0], sample.spacing[1]
    bone = hu > BONE_HU
    if bone.sum() * sx * sy < 100.0:
        return None
    edge = _fov_edge(sample, k) & (hu > TISSUE_HU)
    radius = [max(1, int(round(CLOSE_MM / sx))), max(1, int(round(CLOSE_MM / sy)))]
    pad = max(radius)  # the closing must not be clipped at the image border
    padded = np.pad(bone, pad).astype(np.uint8)
    closed = sitk.GetArrayFromImage(sitk.BinaryMorphologicalClosing(sitk.GetImageFromArray(padded), radius))
    closed = closed[pad:-pad, pad:-pad].astype(bool) | bone
    grow = [int(np.ceil(BRIDGE_MM / sx)), int(np.ceil(BRIDGE_MM / sy))]
    wall = _grown(closed, grow) | edge
    filled = sitk.GetArrayFromImage(sitk.BinaryFillhole(sitk.GetImageFromArray(wall.astype(np.uint8)))).astype(bool)
    inner = filled & ~wall
    if inner.sum() * sx * sy < MIN_CAVITY_MM2 / 2:
        return None
    components = sitk.ConnectedComponent(sitk.GetImageFromArray(inner.astype(np.uint8)))
    labels = sitk.GetArrayFromImage(sitk.RelabelComponent(components, sortByObjectSize=True))
    cavity = _grown(labels == 1, grow) & ~closed & ~edge  # back out to the inner table of the skull
    area = float(cavity.sum() * sx * sy)
    if not MIN_CAVITY_MM2 <= area <= MAX_CAVITY_MM2:
        return None
    values = hu[cavity]
    brain_share = float(np.mean((values >= BRAIN_HU[0]) & (values <= BRAIN_HU[1])))
    if brain_share < MIN_BRAIN_SHARE:
        return None
    ring = _dilate(cavity) & ~cavity
    on_bone = ring & (_dilate(bone) | edge)
    cover = float(on_bone.sum() / max(1, ring.sum()))
    if cover < MIN_BONE_COVER:
        return None
    j, i = np.nonzero(cavity)
    x = sample.origin[0] + i * sx
    y = sample.origin[1] + j * sy
    bj, bi = np.nonzero(ring & closed)
    boundary = np.stack([sample.origin[0] + bi * sx, sample.origin[1] + bj * sy], axis=1)
    return SliceRecord(k, area, (float(x.mean()), float(y.mean())), float(np.ptp(x) + sx), float(np.ptp(y) + sy),
                       brain_share, int(np.count_nonzero(ring & edge & ~closed)), boundary)


def _grown(mask: np.ndarray, radius: list[int]) -> np.ndarray:
    """The mask dilated by a ball of radius (x, y) voxels."""
    grown = sitk.BinaryDilate(sitk.GetImageFromArray(mask.astype(np.uint8)), radius)
    return sitk.GetArrayFromImage(grown).astype(bool)


def _fov_edge(sample: Sample, k: int) -> np.ndarray:
    """Voxels on the edge of the reconstructed field of view: the image border, or next to padding."""
    edge = np.zeros(sample.array.shape[1:], bool)
    edge[0, :] = edge[-1, :] = edge[:, 0] = edge[:, -1] = True
    if sample.padding is not None:
        edge |= _dilate(sample.array[k] <= sample.padding)
    return edge


def _dilate(mask: np.ndarray) -> np.ndarray:
    """4-neighbour dilation by one voxel (numpy: no filter object for a 2D slice)."""
    out = mask.copy()
    out[1:] |= mask[:-1]
    out[:-1] |= mask[1:]
    out[:, 1:] |= mask[:, :-1]
    out[:, :-1] |= mask[:, 1:]
    return out
