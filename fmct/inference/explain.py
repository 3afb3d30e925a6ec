"""Where the model looked: saliency maps on the model grid, one per finding.

`explain_findings` explains several findings of one input for about the price of one:
- Integrated Gradients: ONE forward pass over the IG path per batch of path points, then one
  backward per finding from the same graph (retain_graph). The path is taken in patch-embedding
  space: the ViT's patch embedding is a non-overlapping strided convolution, a linear map P, so
  the input gradient at a path point is P^T of the gradient at its tokens, and the tokens of
  baseline + a (x - baseline) are E(baseline) + a (E(x) - E(baseline)). Accumulating the
  quadrature-weighted token gradients and applying P^T once per finding gives exactly the
  input-space IG (the convolution's backward, ~15% of a backward pass, is paid once instead of
  once per path point and finding). Gauss-Legendre quadrature, as Captum's "gausslegendre".
- Occlusion: each batch of occluded inputs gives every finding's logits at once.
- Attention maps are class-agnostic: computed once, the same map for every finding.

Captum cannot share the forward across targets (`attribute(target=...)` takes one target per
input example; asking for K targets means K copies of the path), so it is kept as the
independent per-finding reference (`explain_captum`, used by the tests and
benchmarks/bench_saliency.py) and imported only there.

Every method returns a non-negative [D, H, W] float32 map scaled to a maximum of 1, which the
Preprocessor maps back onto the CT's grid. torch is imported by this module: import it only
when explaining.
"""
from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import numpy as np
import torch
import torch.nn.functional as F

from fmct.models import FMCTClassifier
from fmct.conventions.runtime import CancelCheck, Progress, check_cancel, check_explain_method, sub_progress

# 16 Gauss-Legendre nodes, kept by measurement (benchmarks/RESULTS.md, "Saliency for every finding").
# Fewer nodes are a quarter of the backward passes but not provably as good: on 30 phantoms (6 per
# hemorrhage type) 4 nodes scored higher (enrichment 12.1x vs 10.9x, pointing game 17/30 vs 16/30), on
# 20 others lower (15.1x vs 18.3x, 12/20 each) and failed test_demo_model's pointing game. The IG
# integrand of a ViT is rough: 32-node maps differ from 16-node ones as much as 4-node ones do.
DEFAULT_IG_STEPS = 16


def explain(
    model: FMCTClassifier,
    x: torch.Tensor,
    task_index: int,
    method: str = "integrated_gradients",
    progress: Progress | None = None,
    cancel: CancelCheck | None = None,
    ig_steps: int | None = None,
) -> np.ndarray:
    """Saliency of one finding's logit for one input x [1, C, D, H, W]."""
    return explain_findings(model, x, [task_index], method, progress, cancel, ig_steps)[0]


def explain_findings(
    model: FMCTClassifier,
    x: torch.Tensor,
    task_indices: Sequence[int],
    method: str = "integrated_gradients",
    progress: Progress | None = None,
    cancel: CancelCheck | None = None,
    ig_steps: int | None = None,
    names: Sequence[str] | None = None,
    batch_size: int | None = None,
) -> list[np.ndarray]:
    """Saliency of each listed finding's logit for one input x [1, C, D, H, W], sharing the model work.

    Returns one map per entry of task_indices, in order; ig_steps defaults to DEFAULT_IG_STEPS.
    progress(fraction, message) is called per batch and per finding ("explaining <name>", names defaulting to "finding <index>"); cancel()
    is checked before every forward batch and every backward pass.
    """
    check_explain_method(method)
    ig_steps = ig_steps or DEFAULT_IG_STEPS
    targets = [int(t) for t in task_indices]
    if not targets:
        return []
    labels = list(names) if names is not None else [f"finding {t}" for t in targets]
    if method.startswith("attention"):
        check_cancel(cancel, "Explanation")
        report = sub_progress(progress, 0.0, 1.0)
        report(0.0, "explaining (attention)")
        m = attention_map(model, x, rollout=method == "attention_rollout")
        report(1.0, "explaining (attention)")
        return [m.copy() for _ in targets]
    batch = batch_size or _batch(x)
    with _frozen(model):
        if method == "integrated_gradients":
            attr = _integrated_gradients(model, x, targets, labels, ig_steps, batch, progress, cancel)
        else:
            attr = _occlusion(model, x, targets, labels, batch, progress, cancel)
    # Evidence for the finding only: voxels whose HU (all windows together) raise its logit.
    # Keeping the positive part doubles the share of saliency inside lesions compared with |attr|
    # (measured on phantoms with the demo model: enrichment 15.9 vs 8.8).
    return [_normalise(_smooth(a.sum(dim=0)[None, None].clamp(min=0).float())[0, 0]) for a in attr]


def _integrated_gradients(model, x, targets, labels, n_steps, batch, progress, cancel) -> list[torch.Tensor]:
    """Per target, the IG attribution [C, D, H, W] with a zero (air) baseline."""
    baseline = torch.zeros_like(x)  # air: 0 in every HU window
    proj = _linear_patch_embedding(model)
    if proj is not None:
        attr = _ig_token_space(model, proj, x, baseline, targets, labels, n_steps, batch, progress, cancel)
    else:
        attr = _ig_input_space(model, x, baseline, targets, labels, n_steps, batch, progress, cancel)
    return [attr[k] for k in range(len(targets))]


def _ig_input_space(model, x, baseline, targets, labels, n_steps, batch, progress, cancel) -> torch.Tensor:
    """IG along the straight path in input space: [K, C, D, H, W], one row per target."""
    shape = (-1,) + (1,) * (x.dim() - 1)

    def point(a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        path = (baseline + a.view(shape) * (x - baseline)).requires_grad_(True)
        return model(path), path

    acc = torch.zeros((len(targets), *x.shape[1:]), device=x.device, dtype=x.dtype)
    _quadrature(point, acc, targets, labels, n_steps, batch, progress, cancel)
    return acc * (x - baseline)


def _ig_token_space(model, proj, x, baseline, targets, labels, n_steps, batch, progress, cancel) -> torch.Tensor:
    """IG along the same path taken in patch-embedding space (exact for a linear patch embedding):
    a forward hook puts the path's tokens where proj's output was, and P^T maps the integrated
    token gradients back to the input once per target. [K, C, D, H, W]."""
    shape = (-1,) + (1,) * (x.dim() - 1)
    with torch.no_grad():
        e1, e0 = proj(x), proj(baseline)
    state: dict[str, torch.Tensor] = {}

    def point(a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        state["path"] = (e0 + a.view(shape) * (e1 - e0)).requires_grad_(True)
        return model(x.expand(len(a), *x.shape[1:])), state["path"]

    acc = torch.zeros((len(targets), *e1.shape[1:]), device=x.device, dtype=x.dtype)
    hook = proj.register_forward_hook(lambda module, inp, out: state["path"])
    try:
        _quadrature(point, acc, targets, labels, n_steps, batch, progress, cancel)
    finally:
        hook.remove()
    # P^T of the token gradients = the input gradients, integrated along the path
    acc = F.conv_transpose3d(acc, proj.weight.to(acc.dtype), stride=proj.stride)
    return acc * (x - baseline)


def _quadrature(point, acc, targets, labels, n_steps, batch, progress, cancel) -> None:
    """The one Gauss-Legendre loop of both paths: per batch of nodes, one forward (``point(alphas)``
    gives the outputs and the path tensor they were computed from), then one backward per target
    from the same graph, the node-weighted gradients summed into acc[k]."""
    alphas, weights = gauss_legendre(n_steps)
    alphas, weights = alphas.to(acc.device, acc.dtype), weights.to(acc.device, acc.dtype)
    report = sub_progress(progress, 0.0, 1.0)
    n_batches = -(-n_steps // batch)
    units, done = n_batches * (1 + len(targets)), 0
    for start in range(0, n_steps, batch):
        a, w = alphas[start:start + batch], weights[start:start + batch]
        check_cancel(cancel, "Explanation")
        with torch.enable_grad():
            out, path = point(a)
            done += 1
            report(done / units, f"explaining {labels[0]}")
            w = w.view((-1,) + (1,) * (path.dim() - 1))
            for k, t in enumerate(targets):
                check_cancel(cancel, "Explanation")
                (grad,) = torch.autograd.grad(out[:, t].sum(), path, retain_graph=k < len(targets) - 1)
                acc[k] += (grad * w).sum(dim=0)
                done += 1
                report(done / units, f"explaining {labels[k]}")
        del out, path


def _occlusion(model, x, targets, labels, batch, progress, cancel) -> list[torch.Tensor]:
    """Captum-style occlusion for all targets from one pass over the occluded inputs.

    Each window (all channels) is replaced by the baseline 0; a voxel's attribution is the mean,
    over the windows that cover it, of logit(x) - logit(x occluded).
    """
    window, stride = _occlusion_window(model)
    spatial = x.shape[2:]
    starts = [range(0, s - w + 1, st) for s, w, st in zip(spatial, window, stride)]
    corners = [(i, j, k) for i in starts[0] for j in starts[1] for k in starts[2]]
    units = -(-len(corners) // batch) + 1
    report = sub_progress(progress, 0.0, 1.0)
    check_cancel(cancel, "Explanation")
    with torch.no_grad():
        ref = model(x)[0, targets]  # [K]
        report(1 / units, f"explaining {', '.join(labels)}")
        total = torch.zeros((len(targets), *spatial), device=x.device, dtype=x.dtype)
        count = torch.zeros(spatial, device=x.device, dtype=x.dtype)
        for n, start in enumerate(range(0, len(corners), batch)):
            check_cancel(cancel, "Explanation")
            chunk = corners[start:start + batch]
            occluded = x.expand(len(chunk), *x.shape[1:]).clone()
            for b, (i, j, k) in enumerate(chunk):
                occluded[b, :, i:i + window[0], j:j + window[1], k:k + window[2]] = 0.0
            delta = ref[None, :] - model(occluded)[:, targets]  # [b, K]
            for b, (i, j, k) in enumerate(chunk):
                region = (slice(i, i + window[0]), slice(j, j + window[1]), slice(k, k + window[2]))
                total[(slice(None), *region)] += delta[b].view(-1, 1, 1, 1)
                count[region] += 1
            report((n + 2) / units, f"explaining {', '.join(labels)}")
    mean = total / count.clamp(min=1)
    return [mean[k][None].expand(x.shape[1], *spatial) for k in range(len(targets))]


def gauss_legendre(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Nodes in [0, 1] and weights (summing to 1) of n-point Gauss-Legendre quadrature (Captum's too)."""
    if n < 1:
        raise ValueError("ig_steps must be at least 1")
    nodes, weights = np.polynomial.legendre.leggauss(n)
    return torch.tensor(0.5 * (1 + nodes), dtype=torch.float64), torch.tensor(0.5 * weights, dtype=torch.float64)


def _linear_patch_embedding(model) -> torch.nn.Conv3d | None:
    """The encoder's patch embedding when it is a plain non-overlapping strided Conv3d (then linear
    in the input up to its bias, which is what the token-space path needs), else None."""
    proj = getattr(getattr(getattr(model, "encoder", None), "patch_embed", None), "proj", None)
    if not isinstance(proj, torch.nn.Conv3d):
        return None
    if (tuple(proj.kernel_size) != tuple(proj.stride) or any(proj.padding) or any(d != 1 for d in proj.dilation)
            or proj.groups != 1 or proj.padding_mode != "zeros" or proj._forward_hooks):
        return None
    return proj


@contextmanager
def _frozen(model) -> Iterator[None]:
    """Parameters need no gradients here: the graph only records what the input gradients need."""
    params = [p for p in model.parameters() if p.requires_grad]
    for p in params:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p in params:
            p.requires_grad_(True)


def attention_map(model: FMCTClassifier, x: torch.Tensor, rollout: bool = False) -> np.ndarray:
    """CLS-to-patch attention of the last block (or rolled out through all blocks), upsampled."""
    maps = [a.float().mean(dim=1) for a in model.encoder.attention_maps(x)]  # each [B, 1+N, 1+N]
    if rollout:
        eye = torch.eye(maps[0].shape[-1], device=maps[0].device)
        joint = eye
        for a in maps:  # Abnar & Zuidema: residual path as identity, rows renormalised
            a = 0.5 * a + 0.5 * eye
            joint = (a / a.sum(dim=-1, keepdim=True)) @ joint
        cls_to_patch = joint[:, 0, 1:]
    else:
        cls_to_patch = maps[-1][:, 0, 1:]
    grid = tuple(s // p for s, p in zip(x.shape[2:], model.encoder.cfg.patch_size))
    coarse = cls_to_patch.reshape(1, 1, *grid)
    fine = F.interpolate(coarse, size=tuple(x.shape[2:]), mode="trilinear", align_corners=False)
    return _normalise(fine[0, 0])


def explain_captum(
    model: FMCTClassifier,
    x: torch.Tensor,
    task_index: int,
    method: str = "integrated_gradients",
    ig_steps: int = 16,
    cancel: CancelCheck | None = None,
) -> np.ndarray:
    """The per-finding reference: Captum's IntegratedGradients / Occlusion for one finding (how every
    map was made before explain_findings). For tests and benchmarks; imports captum."""
    from captum.attr import IntegratedGradients, Occlusion

    def forward(inp: torch.Tensor) -> torch.Tensor:
        check_cancel(cancel, "Explanation")
        return model(inp)[:, task_index]

    with torch.enable_grad():
        if method == "integrated_gradients":
            attr = IntegratedGradients(forward).attribute(
                x, baselines=torch.zeros_like(x), n_steps=ig_steps, internal_batch_size=_batch(x),
                method="gausslegendre")
        elif method == "occlusion":
            window, stride = _occlusion_window(model)
            attr = Occlusion(forward).attribute(
                x, sliding_window_shapes=(x.shape[1], *window), strides=(x.shape[1], *stride),
                baselines=0.0, perturbations_per_eval=_batch(x))
        else:
            raise ValueError(f"explain_captum covers integrated_gradients and occlusion, not {method}")
    attr = attr.sum(dim=1, keepdim=True).clamp(min=0)
    return _normalise(_smooth(attr.float())[0, 0])


def _occlusion_window(model: FMCTClassifier) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Occlude cubes of 2x2x2 patches, overlapping by half: smooth maps at ~350 forwards for 64^3."""
    patch = tuple(model.encoder.cfg.patch_size)
    return tuple(2 * p for p in patch), patch


def _batch(x: torch.Tensor) -> int:
    """Path points (or occluded inputs) per forward: 4 on CPU (measured fastest on 2 cores), 16 on a GPU."""
    return 16 if x.device.type == "cuda" else 4


def _smooth(t: torch.Tensor, sigma: float = 1.0) -> torch.Tensor:
    """Light Gaussian blur: gradient maps are speckled at the voxel level, findings are not."""
    radius = int(3 * sigma)
    k = torch.exp(-0.5 * (torch.arange(-radius, radius + 1, dtype=t.dtype, device=t.device) / sigma) ** 2)
    k = k / k.sum()
    for dim in range(3):
        shape = [1, 1, 1, 1, 1]
        shape[2 + dim] = -1
        pad = [0, 0, 0, 0, 0, 0]
        pad[2 * (2 - dim)] = pad[2 * (2 - dim) + 1] = radius
        t = F.conv3d(F.pad(t, pad, mode="replicate"), k.reshape(shape))
    return t


def _normalise(t: torch.Tensor) -> np.ndarray:
    a = t.detach().cpu().numpy().astype(np.float32)
    a = np.maximum(a, 0)
    peak = float(a.max())
    return a / peak if peak > 0 else a

