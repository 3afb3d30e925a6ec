"""Multi-crop 3D augmentation for self-distillation, on preprocessed model-grid tensors.

Each sample gets its own ``torch.Generator`` seeded from (run seed, epoch, dataset index), so
the crops of a step depend only on where the run is, never on how it got there: a resumed run
sees exactly the crops an uninterrupted run would have seen.

Crop, resize, LR flip and a small rotation are one affine resampling (``F.affine_grid`` +
``F.grid_sample``), so each view is interpolated once. We use torch rather than
monai.transforms.RandAffine here because MONAI's randomness lives in a numpy RandomState per
transform, which cannot be driven by the per-sample torch.Generator that makes resume exact.
Padding is zeros, which is air in every HU window channel.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from fmct.ssl.config import CropSection


def sample_generator(*keys: int) -> torch.Generator:
    """A generator for e.g. (seed, epoch, index): well mixed, so nearby keys give unrelated streams."""
    state = np.random.SeedSequence([int(k) for k in keys]).generate_state(2, dtype=np.uint32)
    return torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1]))


def _uniform(gen: torch.Generator, lo: float, hi: float, n: int = 1) -> torch.Tensor:
    return lo + (hi - lo) * torch.rand(n, generator=gen, dtype=torch.float64)


def _rotation(gen: torch.Generator, max_deg: float) -> torch.Tensor:
    """A small random rotation (three axis angles, each within +-max_deg)."""
    a = _uniform(gen, -max_deg, max_deg, 3) * math.pi / 180.0
    c, s = torch.cos(a), torch.sin(a)
    rx = torch.tensor([[1, 0, 0], [0, c[0], -s[0]], [0, s[0], c[0]]], dtype=torch.float64)
    ry = torch.tensor([[c[1], 0, s[1]], [0, 1, 0], [-s[1], 0, c[1]]], dtype=torch.float64)
    rz = torch.tensor([[c[2], -s[2], 0], [s[2], c[2], 0], [0, 0, 1]], dtype=torch.float64)
    return rz @ ry @ rx


@dataclass
class MultiCropAugmentation:
    """volume [C, D, H, W] -> {"global": [2, C, *global_size], "local": [n_local, C, *local_size]}."""

    cfg: CropSection

    def __call__(self, volume: torch.Tensor, gen: torch.Generator, n_local: int | None = None) -> dict[str, torch.Tensor]:
        """n_local: how many local crops (default cfg.n_local); the global views come first from gen,
        so they are the same whatever n_local is."""
        volume = volume.float()
        n_local = self.cfg.n_local if n_local is None else n_local
        globals_ = [self.view(volume, gen, self.cfg.global_scale, self.cfg.global_size) for _ in range(2)]
        locals_ = [self.view(volume, gen, self.cfg.local_scale, self.cfg.local_size) for _ in range(n_local)]
        out = {"global": torch.stack(globals_)}
        out["local"] = torch.stack(locals_) if locals_ else volume.new_zeros((0, volume.shape[0], *self.cfg.local_size))
        return out

    def view(self, volume: torch.Tensor, gen: torch.Generator, scale: tuple[float, float], size: tuple[int, int, int]) -> torch.Tensor:
        x = self.random_resized_crop(volume, gen, scale, size)
        x = self.window_jitter(x, gen)
        return self.noise(x, gen)

    def random_resized_crop(self, volume: torch.Tensor, gen: torch.Generator, scale: tuple[float, float],
                            size: tuple[int, int, int]) -> torch.Tensor:
        """Crop a box covering a random fraction of the volume, rotate slightly, flip LR, resize."""
        theta = self.crop_theta(gen, scale)
        grid = F.affine_grid(theta.unsqueeze(0).float(), [1, volume.shape[0], *size], align_corners=False)
        return F.grid_sample(volume.unsqueeze(0), grid, mode="bilinear", padding_mode="zeros", align_corners=False)[0]

    def crop_theta(self, gen: torch.Generator, scale: tuple[float, float]) -> torch.Tensor:
        """The random crop as an affine_grid matrix [3, 4] (float64): box fraction, aspect, centre, LR flip,
        rotation, drawn from gen in that order (the batched path draws the same)."""
        frac = float(_uniform(gen, *scale))
        aspect = torch.exp(_uniform(gen, -self.cfg.aspect_jitter, self.cfg.aspect_jitter, 3))
        side = (frac ** (1.0 / 3.0) * aspect).clamp(max=1.0)  # half-extent in normalised [-1, 1] units
        centre = (torch.rand(3, generator=gen, dtype=torch.float64) * 2 - 1) * (1 - side)
        flip = float(torch.rand(1, generator=gen)) < self.cfg.flip_lr
        rot = _rotation(gen, self.cfg.max_rotation_deg)
        # affine_grid's coordinates are (x, y, z) = (W, H, D); our sides/centres are in (D, H, W).
        s = side.flip(0)
        if flip:  # x is the patient's left-right axis in LPS model grids
            s = s * torch.tensor([-1.0, 1.0, 1.0], dtype=torch.float64)
        return torch.cat([rot @ torch.diag(s), centre.flip(0).unsqueeze(1)], dim=1)

    def window_jitter(self, x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        """Scale and shift each window channel slightly: mimics scanner and calibration drift."""
        c = x.shape[0]
        scale = 1.0 + _uniform(gen, -self.cfg.window_scale, self.cfg.window_scale, c).float()
        shift = _uniform(gen, -self.cfg.window_shift, self.cfg.window_shift, c).float()
        return (x * scale.view(c, 1, 1, 1) + shift.view(c, 1, 1, 1)).clamp(0.0, 1.0)

    def noise(self, x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        """Gaussian noise of a random level up to noise_std (quantum noise varies with dose)."""
        if self.cfg.noise_std <= 0:
            return x
        std = float(_uniform(gen, 0.0, self.cfg.noise_std))
        return x + std * torch.randn(x.shape, generator=gen)


def collate_crops(samples: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Stack per-sample views crop-major, as DINO does: [crop0 of all samples, crop1 of all, ...]."""
    out = {}
    for key in ("global", "local"):
        views = torch.stack([s[key] for s in samples], dim=1)  # [n_views, B, C, D, H, W]
        out[key] = views.flatten(0, 1)
    return out
