"""What varies between phantoms, per population: the ranges a phantom draws its anatomy and scanner
from, and the named presets ("default", and "ood" for robustness tests).

Kept apart from the sampling code so a user can read (or build) a population without reading how
a head is drawn.
"""
from __future__ import annotations

from dataclasses import dataclass

from fmct.conventions.errors import ConfigError
from fmct.phantom.common import Range


@dataclass(frozen=True)
class AnatomySettings:
    """Ranges each phantom draws its anatomy and scanner from; a preset is one population."""

    head_semi_axes_mm: tuple[Range, Range, Range] = ((68.0, 80.0), (86.0, 100.0), (80.0, 92.0))  # LR, AP, SI (above centre)
    scalp_thickness_mm: Range = (4.0, 7.0)
    skull_thickness_mm: Range = (5.0, 8.0)
    atrophy: Range = (0.0, 0.35)            # 0 young .. 1 very atrophic: sulcal, cisternal and ventricular CSF
    ventricle_scale: Range = (0.85, 1.15)
    grey_matter_hu: Range = (37.0, 44.0)    # cortex; reported 35-40 HU: "realistic" has that (the shipped model needs this)
    white_matter_hu: Range = (24.0, 30.0)
    csf_hu: Range = (3.0, 10.0)
    bone_hu: Range = (1200.0, 1800.0)
    noise_hu: Range = (2.5, 6.0)            # at 5 mm slices; thinner slices get sqrt(5/t) more, at most 25
    kernel_fwhm_mm: Range = (0.8, 1.4)      # in-plane resolution of the reconstruction kernel
    rotation_deg: tuple[Range, Range, Range] = ((-8.0, 8.0), (-5.0, 15.0), (-6.0, 6.0))  # yaw, pitch (+ chin down), roll
    offset_mm: tuple[Range, Range, Range] = ((-10.0, 10.0), (-5.0, 20.0), (-40.0, 40.0))  # head centre in scanner LPS
    scan_below_centre_mm: Range = (55.0, 72.0)  # where the scan starts, below the brain centre
    calcification_prob: float = 0.6        # choroid plexus / pineal calcifications (hyperdense mimics)
    frontal_sinus_prob: float = 0.8
    headrest_prob: float = 0.8
    background_hu: float = -1024.0          # outside the reconstruction circle
    # Realism added for issue #12 item 3 (drawn after everything above, from the same or a separate
    # generator, so a phantom's other voxels do not depend on them):
    sutures: bool = True                   # coronal, sagittal, lambdoid sutures: thin lucent zigzags in the calvarium
    suture_open: Range = (0.3, 0.8)        # how unfused a suture is (share of soft tissue in its gap)
    edh_limited_by_sutures: bool = True    # the dura is fixed at the sutures: an epidural stops there
    mastoid_prob: float = 0.9              # pneumatised mastoids (air cells in the temporal bone)
    tentorium: bool = False                # the dural tent over the posterior fossa (on in "realistic")
    beam_hardening_prob: float = 0.0       # dark band / streaks between the petrous bones (artifacts stage)
    beam_hardening_hu: Range = (8.0, 25.0)  # depth of the dark band
    dural_subdural_prob: float = 0.0       # share of small subdurals along the falx / tentorium instead of the convexity


ANATOMY_PRESETS: dict[str, AnatomySettings] = {
    "default": AnatomySettings(),
    # Older, atrophic, broad heads on a sharper, noisier scanner that pads with -3024: an
    # out-of-distribution population for robustness tests.
    "ood": AnatomySettings(
        head_semi_axes_mm=((76.0, 86.0), (84.0, 94.0), (84.0, 96.0)),
        skull_thickness_mm=(6.5, 10.0),
        atrophy=(0.55, 1.0),
        ventricle_scale=(1.3, 1.8),
        grey_matter_hu=(33.0, 37.0),
        white_matter_hu=(28.0, 31.0),
        noise_hu=(9.0, 14.0),
        kernel_fwhm_mm=(0.5, 0.8),
        rotation_deg=((-15.0, 15.0), (-12.0, 25.0), (-12.0, 12.0)),
        scan_below_centre_mm=(62.0, 80.0),
        calcification_prob=0.9,
        headrest_prob=0.3,
        background_hu=-3024.0,
    ),
    # The population the next demo-model retrain is meant for (issue #12 items 2-3): everything of
    # "default", plus the realism the shipped demo model has not seen and that moves its answers
    # (cortex at 34-41 HU, the tentorium, skull-base beam hardening, subdurals along the falx and
    # the tentorium) and wider intensity, noise, kernel and pose ranges.
    "realistic": AnatomySettings(
        grey_matter_hu=(34.0, 41.0),
        white_matter_hu=(22.0, 31.0),
        csf_hu=(0.0, 12.0),
        bone_hu=(1000.0, 2000.0),
        noise_hu=(1.5, 10.0),
        kernel_fwhm_mm=(0.6, 1.8),
        rotation_deg=((-12.0, 12.0), (-10.0, 20.0), (-10.0, 10.0)),
        scan_below_centre_mm=(45.0, 80.0),
        tentorium=True,
        beam_hardening_prob=0.7,
        dural_subdural_prob=0.3,
    ),
}


def _resolve_anatomy(anatomy: str | AnatomySettings) -> tuple[AnatomySettings, str]:
    if isinstance(anatomy, AnatomySettings):
        return anatomy, "custom"
    if anatomy not in ANATOMY_PRESETS:
        raise ConfigError(f"Unknown anatomy preset {anatomy!r}: use one of {', '.join(ANATOMY_PRESETS)} "
                          "or pass an AnatomySettings.")
    return ANATOMY_PRESETS[anatomy], anatomy
