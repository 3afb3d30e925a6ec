"""Multi-crop for a whole batch at once, as tensor operations on the batch's device (a GPU).

Why: the per-sample path (fmct.ssl.augment.MultiCropAugmentation) runs at ~4.4 samples/s per CPU
core at the base preset, while one H100 consumes ~150 volumes/s; with the 8-worker cap the GPU
waits. Here the loader only reads volumes (int16 HU from a prepared cache: 2 bytes a voxel over
PCIe); the windows, crops, window jitter and noise run on the device: one affine_grid +
grid_sample per view over the whole batch.

The random stream stays a pure function of where the run is, so resume stays exact:
- each sample's crop and jitter parameters come from the same per-sample CPU generator
  (seed, epoch, index) and in the same order as the per-sample path (scalars only: cheap);
- the noise fields come from one device generator per step, seeded from (seed, step, rank).
With crops.noise_std == 0 the views equal the per-sample path's exactly (same parameters, same
interpolation; the noise is the only draw the two paths make differently: the per-sample path
draws it on the CPU from the sample's generator, which would cost the CPU what this saves).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from fmct.ssl.augment import MultiCropAugmentation, _uniform, sample_generator
from fmct.ssl.config import CropSection

NOISE_KEY = 0x6E6F6973  # "nois": keeps the noise stream apart from the masks' (seed, step, rank) stream


@dataclass
class ViewParams:
    """Every view of a batch, crop-major (row v * B + b is view v of sample b), as collate_crops orders them."""

    theta: torch.Tensor  # [V*B, 3, 4] float64
    scale: torch.Tensor  # [V*B, C] float32
    shift: torch.Tensor  # [V*B, C] float32
    std: torch.Tensor  # [V*B] float32 (noise level; 0 without noise)


def device_generator(device: torch.device, *keys: int) -> torch.Generator:
    """A generator on device seeded from keys (the same mixing as sample_generator)."""
    state = np.random.SeedSequence([int(k) for k in keys]).generate_state(2, dtype=np.uint32)
    return torch.Generator(device=device).manual_seed(int(state[0]) << 32 | int(state[1]))


class BatchedMultiCrop:
    """[B, C, D, H, W] channels, or [B, D, H, W] HU with windows, on any device -> {"global": [2B, C, ...],
    "local": [n_local*B, C, ...]}, crop-major like fmct.ssl.augment.collate_crops."""

    def __init__(self, cfg: CropSection, windows: Sequence = ()) -> None:
        self.cfg, self.windows = cfg, tuple(windows)
        self.per_sample = MultiCropAugmentation(cfg)  # the one home of the crop parameters' draws

    def draw(self, keys: Sequence[Sequence[int]], channels: int, n_views: int) -> list[list[tuple]]:
        """Per sample, its views' parameters, drawn from sample_generator(*key) in the per-sample order."""
        c = self.cfg
        out = []
        for key in keys:
            gen = sample_generator(*key)
            views = []
            for v in range(n_views):
                view_scale = c.global_scale if v < 2 else c.local_scale
                theta = self.per_sample.crop_theta(gen, view_scale)
                jitter = 1.0 + _uniform(gen, -c.window_scale, c.window_scale, channels).float()
                shift = _uniform(gen, -c.window_shift, c.window_shift, channels).float()
                std = float(_uniform(gen, 0.0, c.noise_std)) if c.noise_std > 0 else 0.0
                views.append((theta, jitter, shift, std))
            out.append(views)
        return out

    def params(self, keys: Sequence[Sequence[int]], channels: int, n_local: int) -> tuple[ViewParams, ViewParams]:
        """The global and the local views' parameters, crop-major."""
        drawn = self.draw(keys, channels, 2 + n_local)

        def stack(views: range) -> ViewParams:
            rows = [drawn[b][v] for v in views for b in range(len(keys))]
            if not rows:
                return ViewParams(torch.zeros(0, 3, 4, dtype=torch.float64), torch.zeros(0, channels),
                                  torch.zeros(0, channels), torch.zeros(0))
            return ViewParams(torch.stack([r[0] for r in rows]), torch.stack([r[1] for r in rows]),
                              torch.stack([r[2] for r in rows]), torch.tensor([r[3] for r in rows], dtype=torch.float32))

        return stack(range(2)), stack(range(2, 2 + n_local))

    def views(self, x: torch.Tensor, p: ViewParams, size: Sequence[int], noise: torch.Generator | None) -> torch.Tensor:
        """All views of p for the batch x [B, C, D, H, W]: one grid_sample per view index over the batch."""
        b, c = x.shape[:2]
        n_views = p.theta.shape[0] // max(b, 1)
        if n_views == 0:
            return x.new_zeros((0, c, *size))
        out = []
        for v in range(n_views):
            rows = slice(v * b, (v + 1) * b)
            grid = F.affine_grid(p.theta[rows].float().to(x.device), [b, c, *size], align_corners=False)
            y = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
            y = (y * p.scale[rows].to(x.device).view(b, c, 1, 1, 1) + p.shift[rows].to(x.device).view(b, c, 1, 1, 1)).clamp(0.0, 1.0)
            if noise is not None:
                y = y + p.std[rows].to(x.device).view(b, 1, 1, 1, 1) * torch.randn(y.shape, generator=noise, device=x.device)
            out.append(y)
        return torch.cat(out)

    def __call__(self, volumes: torch.Tensor, keys: Sequence[Sequence[int]], n_local: int,
                 noise_key: Sequence[int] = (0,)) -> dict[str, torch.Tensor]:
        """volumes: [B, C, D, H, W] window channels, or [B, D, H, W] HU (windows applied here, on its device);
        keys: per sample (seed, epoch, dataset index); noise_key: e.g. (seed, step, rank)."""
        if volumes.ndim == 4:
            from fmct.data.cache import windows_to_channels

            if not self.windows:
                raise ValueError("HU volumes need the windows to make channels from")
            volumes = windows_to_channels(volumes, self.windows)
        x = volumes.float()
        g, l_ = self.params(keys, x.shape[1], n_local)
        noise = device_generator(x.device, *noise_key, NOISE_KEY) if self.cfg.noise_std > 0 else None
        return {"global": self.views(x, g, self.cfg.global_size, noise), "local": self.views(x, l_, self.cfg.local_size, noise)}
