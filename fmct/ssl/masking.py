"""Block-wise random patch masks for masked image modeling (iBOT / BEiT style, in 3D).

Masking whole cuboids rather than scattered patches matters more in CT than in photographs:
neighbouring patches of a head CT are so alike that a lone hidden patch is trivially copied
from its neighbours; a hidden block forces the model to reason about anatomy.
"""
from __future__ import annotations

import math

import torch


class BlockMasking3D:
    """Masks exactly ``num_masked`` patches of a (D, H, W) patch grid, mostly as random cuboids."""

    def __init__(self, grid: tuple[int, int, int], min_block: int = 4, max_aspect: float = 3.0, attempts: int = 10) -> None:
        self.grid = grid
        self.min_block = min_block
        self.log_aspect = (-math.log(max_aspect), math.log(max_aspect))
        self.attempts = attempts

    @property
    def num_patches(self) -> int:
        return math.prod(self.grid)

    def __call__(self, num_masked: int, gen: torch.Generator) -> torch.Tensor:
        mask = torch.zeros(self.grid, dtype=torch.bool)
        num_masked = min(max(int(num_masked), 0), self.num_patches)
        for _ in range(self.attempts * 4):
            left = num_masked - int(mask.sum())
            if left <= 0:
                break
            self._add_block(mask, left, gen)
        left = num_masked - int(mask.sum())
        if left > 0:  # top up with single patches so every image hides exactly num_masked
            free = (~mask).flatten().nonzero().squeeze(1)
            pick = free[torch.randperm(len(free), generator=gen)[:left]]
            mask.view(-1)[pick] = True
        return mask.flatten()

    def _add_block(self, mask: torch.Tensor, max_new: int, gen: torch.Generator) -> None:
        """Try to add one cuboid that masks at least one new and at most max_new patches."""
        for _ in range(self.attempts):
            volume = self.min_block + float(torch.rand(1, generator=gen)) * max(max_new - self.min_block, 0)
            a = torch.exp(self.log_aspect[0] + torch.rand(2, generator=gen) * (self.log_aspect[1] - self.log_aspect[0]))
            base = (volume / float(a[0] * a[1])) ** (1.0 / 3.0)
            sides = [max(1, min(g, round(base * f))) for g, f in zip(self.grid, (1.0, float(a[0]), float(a[1])))]
            start = [int(torch.randint(0, g - s + 1, (1,), generator=gen)) for g, s in zip(self.grid, sides)]
            region = mask[start[0]:start[0] + sides[0], start[1]:start[1] + sides[1], start[2]:start[2] + sides[2]]
            new = int((~region).sum())
            if 0 < new <= max_new:
                region.fill_(True)
                return


def sample_masks(batch: int, grid: tuple[int, int, int], ratio: tuple[float, float], probability: float,
                 gen: torch.Generator) -> torch.Tensor:
    """Masks [batch, N] for the global crops: a share ``probability`` of them masked.

    Ratios are spread evenly over [min, max] across the masked images (as DINOv2 does), so
    every batch trains on easy and hard reconstructions alike.
    """
    masker = BlockMasking3D(grid)
    n_masked_images = int(round(batch * probability))
    ratios = torch.linspace(ratio[0], ratio[1], n_masked_images + 1)[1:] if n_masked_images else torch.empty(0)
    masks = [masker(int(masker.num_patches * float(r)), gen) for r in ratios]
    masks += [torch.zeros(masker.num_patches, dtype=torch.bool)] * (batch - n_masked_images)
    order = torch.randperm(batch, generator=gen)
    return torch.stack(masks)[order]
