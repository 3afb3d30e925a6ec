"""What tells a self-distillation run that learns from one that has collapsed.

Entropy alone misleads: a very sharp teacher gives low-entropy targets on features that encode
nothing. So every step also logs what the encoder's features do with the two global views:

- ``view_gap``: mean cosine similarity of the two views of one CT minus that of views of two
  different CTs (teacher CLS, L2-normalised). Above 0 the encoder tells CTs apart across views;
  near 0 it does not (whatever the loss says).
- ``view_retrieval``: share of view-1 features whose nearest view-2 feature is the same CT's.
- ``feature_spread``: sqrt of the mean squared distance of the normalised CLS features to their
  batch mean (0 = every CT gets the same feature, ~1 = spread over the sphere). DINO's collapse
  shows here first.
- ``pixel_view_ratio`` (data, not model): rms pixel distance between the two views of one CT over
  that between views of different CTs. Below 1 the views are calibrated (a view is more like its
  own CT than another CT); at or above 1 the augmentations erase what tells CTs apart, and no
  encoder can learn to match views.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


@torch.no_grad()
def view_metrics(view_a: torch.Tensor, view_b: torch.Tensor) -> dict[str, torch.Tensor]:
    """view_a, view_b: [B, D] features of view 1 and view 2 of the same B CTs (row i = CT i)."""
    a, b = F.normalize(view_a.float(), dim=-1), F.normalize(view_b.float(), dim=-1)
    n = a.shape[0]
    both = torch.cat([a, b])
    spread = (both - both.mean(dim=0, keepdim=True)).pow(2).sum(dim=-1).mean().sqrt()
    if n < 2:
        zero = a.new_zeros(())
        return {"view_gap": zero, "view_retrieval": zero, "feature_spread": spread}
    sim = a @ b.t()
    same = sim.diag().mean()
    other = (sim.sum() - sim.diag().sum()) / (n * (n - 1))
    target = torch.arange(n, device=a.device)
    retrieval = 0.5 * ((sim.argmax(dim=1) == target).float().mean() + (sim.argmax(dim=0) == target).float().mean())
    return {"view_gap": same - other, "view_retrieval": retrieval, "feature_spread": spread}


@torch.no_grad()
def pixel_view_ratio(view_a: torch.Tensor, view_b: torch.Tensor) -> torch.Tensor:
    """rms(view 1, view 2 of one CT) / rms(view 1 of one CT, view 2 of another); [B, ...] each, B >= 2."""
    a, b = view_a.float().flatten(1), view_b.float().flatten(1)
    n = a.shape[0]
    if n < 2:
        return a.new_zeros(())
    d = torch.cdist(a, b) / a.shape[1] ** 0.5  # [B, B] rms distances
    same = d.diag().mean()
    other = (d.sum() - d.diag().sum()) / (n * (n - 1))
    return same / other.clamp_min(1e-12)


@torch.no_grad()
def logit_spread(logits: torch.Tensor) -> torch.Tensor:
    """How much the teacher's logits vary across the batch (mean over prototypes of the std over rows).

    A teacher temperature well below this makes the targets sharp; far above it, uniform.
    """
    if logits.shape[0] < 2:
        return logits.new_zeros(())
    return logits.float().std(dim=0).mean()
