"""The sample CT the demos show: one rule, one seed, for `fmct demo` and Slicer's Sample Data.

A subdural hematoma phantom with thick slices, its seed chosen by benchmarks/pick_demo_seed.py's rule
(well inside the model's distribution, the headline findings any_hemorrhage and subdural decided
correctly, the fewest wrong findings, then the largest margin) for the shipped demo model. Rerun
that script when the demo model changes, and set DEMO_SEED to what it prints: Testing/test_sample_data.py
asserts the shipped model's answer on this CT, so a stale seed fails a test instead of showing a
miss (issue 27: Slicer's seed 7 predated the retrained model, which missed its subdural).
"""
from __future__ import annotations

from fmct.phantom.generate import Phantom, make_phantom

DEMO_SEED = 20
DEMO_FINDINGS = ("subdural",)
HEADLINE = ("any_hemorrhage", "subdural")  # what the sample is: a subdural hematoma
DEMO_IN_PLANE_SIZE = 512


def demo_sample(seed: int = DEMO_SEED, in_plane_size: int = DEMO_IN_PLANE_SIZE) -> Phantom:
    """The demo's sample CT (and its truth) for a seed; the defaults give the CT `fmct demo` and Slicer show."""
    return make_phantom(seed, findings=list(DEMO_FINDINGS), slices="thick", in_plane_size=in_plane_size)
