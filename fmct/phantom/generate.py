"""`make_phantom`: one synthetic head CT with its masks and labels, and the `Phantom` it returns.

The pipeline in one place: separate child generators for anatomy, findings, lesions, scan and
noise (so the same seed with other findings gives the same head), then anatomy -> plan -> scan ->
scene -> render -> into the scanner -> head rest, beam hardening, noise -> masks, labels and info.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from fmct.conventions.errors import ConfigError
from fmct.phantom.anatomy import _sample_anatomy
from fmct.phantom.artifacts import _add_beam_hardening, _add_headrest, _add_noise_and_circle
from fmct.phantom.findings import _plan_findings
from fmct.phantom.grid import _render_grid
from fmct.phantom.render import _render
from fmct.phantom.scan import _sample_scan
from fmct.phantom.scanner import _place_in_scanner
from fmct.phantom.scene import _Scene
from fmct.phantom.settings import AnatomySettings, _resolve_anatomy
from fmct.phantom.truth import _info, _masks_and_labels
from fmct.reading.volume import Volume


@dataclass
class Phantom:
    """A synthetic CT, its ground truth, and how it was made.

    masks: one bool array on volume.array's grid for every positive task.
    labels: 0/1 for every name in TASKS.
    info: JSON-serialisable parameters (seed, geometry, lesion centres in scanner LPS mm, ...).
    """

    volume: Volume
    masks: dict[str, np.ndarray]
    labels: dict[str, int]
    info: dict


def make_phantom(
    seed: int,
    *,
    findings: Sequence[str] | None = None,
    slices: str = "random",
    in_plane_size: int = 512,
    fov_mm: float = 230.0,
    anatomy: str | AnatomySettings = "default",
) -> Phantom:
    """One synthetic head CT with its masks and labels; the same arguments give the same voxels.

    findings: None draws them at random (about half the phantoms bleed); otherwise exactly these,
    plus what they imply: "mass_effect" adds a large intraparenchymal, subdural or epidural
    hematoma to cause it (one of those requested, if any); "midline_shift" means mass effect with a
    shift of at least 5 mm; "any_hemorrhage" alone adds one hemorrhage type at random.
    """
    settings, anatomy_name = _resolve_anatomy(anatomy)
    _check_arguments(slices, in_plane_size, fov_mm)
    # the sixth generator (artifacts added for issue #12) leaves the first five, and so older phantoms, as they were
    rng_anat, rng_find, rng_lesion, rng_scan, rng_noise, rng_artifacts = (
        np.random.default_rng(s) for s in np.random.SeedSequence(int(seed)).spawn(6))
    anat = _sample_anatomy(rng_anat, settings)
    plan = _plan_findings(rng_find, findings)
    scan = _sample_scan(rng_scan, settings, anat, slices, in_plane_size, fov_mm)
    scene = _Scene(anat, scan.rotation, plan, rng_lesion)
    grid = _render_grid(anat, scan)
    hu, bits = _render(scene, grid)
    array, out_bits = _place_in_scanner(hu, bits, grid, scan, anat)
    _add_headrest(array, scan)
    beam = _add_beam_hardening(array, scan, anat, rng_artifacts, settings.beam_hardening_prob, settings.beam_hardening_hu)
    _add_noise_and_circle(array, scan, rng_noise)
    volume = Volume(array, scan.spacing, scan.origin, np.eye(3), {"series_description": "FMCT phantom"})
    masks, labels = _masks_and_labels(out_bits, scene)
    info = _info(seed, anatomy_name, anat, scan, scene, labels)
    if beam is not None:
        info["beam_hardening"] = beam
    return Phantom(volume, masks, labels, info)


def _check_arguments(slices: str, in_plane_size: int, fov_mm: float) -> None:
    if slices not in ("thick", "thin", "random"):
        raise ConfigError(f"slices must be 'thick', 'thin' or 'random', got {slices!r}.")
    if not 32 <= int(in_plane_size) <= 2048:
        raise ConfigError(f"in_plane_size must be between 32 and 2048 pixels, got {in_plane_size}.")
    if not 200.0 <= float(fov_mm) <= 500.0:
        raise ConfigError(f"fov_mm must be between 200 and 500 mm so the head fits, got {fov_mm}.")
