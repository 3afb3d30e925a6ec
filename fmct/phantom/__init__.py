"""Synthetic head CTs with findings and lesion masks, deterministic by seed.

Phantoms train and test the detector (labels), test that saliency falls inside lesions (masks),
and exercise readers, preprocessing and the Slicer modules without patient data. So they must be
plausible in a brain window, varied, exactly reproducible from a seed, and fast enough to make
thousands.

How it is built, and why:
- Anatomy lives in a head-local frame (mm, origin at the brain centre, x = patient left,
  y = posterior, z = superior). Every structure is a signed-distance-like field, drawn with a soft
  edge one voxel wide, so thin things (sulci, falx, a fracture gap) keep their partial volume
  instead of aliasing away.
- Fields are rasterised on an isotropic grid in that frame (0.75 to 1.6 mm depending on the
  output pixel), in z-chunks that stay in cache, each structure only inside its bounding box;
  the gyral pattern is tabulated over directions and interpolated from a coarse grid.
- The head is then placed in the scanner (tilt and offset) by resampling that grid once
  (SimpleITK, C++); thick slices average several sub-slices (partial volume), masks take the
  union over them. Correlated noise, the reconstruction circle and a head rest come last.
- Random draws come from separate child generators for anatomy, findings, lesions and scan, so
  the same seed with other findings gives the same head (the mass-effect test relies on this).

One module per stage, in the order `make_phantom` runs them:
  settings    the populations (AnatomySettings, ANATOMY_PRESETS: default, ood, realistic)
  anatomy     one sampled head and its landmark surfaces
  findings    which findings, the mass effect, the lesion bits
  scan        slice thickness, pixel, field of view, pose, head rest
  grid        the isotropic render grid and its chunks
  draw        soft-edged signed-distance drawing primitives
  sulci       the gyral pattern
  scene       normal anatomy plus lesions, as structures with boxes
  lesions     each lesion: box, drawing, record
  render      HU and lesion bits in the head frame
  scanner     resampling onto the axial slices (partial volume)
  artifacts   head rest, skull-base beam hardening, correlated noise, reconstruction circle
  truth       labels, masks and the info record
  generate    make_phantom and Phantom
  writers     write_phantom_set: a phantom dataset on disk
  common      helpers all of them share
  variations  the same head scanned otherwise (pose, FOV, kernel, noise, slices, contrast, size): benchmarks, OOD tests,
              training augmentation (fmct.data.rescan draws among them)
The task names the labels use are in `fmct.conventions.tasks`.
"""
from __future__ import annotations

from fmct.phantom.generate import Phantom, make_phantom
from fmct.phantom.settings import ANATOMY_PRESETS, AnatomySettings
from fmct.phantom.writers import write_phantom_set

__all__ = ["ANATOMY_PRESETS", "AnatomySettings", "Phantom", "make_phantom", "write_phantom_set"]
