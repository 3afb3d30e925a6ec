"""Where the model looked: saliency maps on the model grid, one per finding.

`explain_study` explains several findings of one input for about the price of one:
- Integrated Gradients: ONE forward pass over the IG path per batch of path points, then one
  backward per finding from the same graph (retain_graph). The path is taken in patch-embedding
  space: the ViT's patch embedding is a non-overlapping strided convolution, a linear map P, so
  the input gradient at a path point is P^T of the gradient at its tokens, and the tokens of
  baseline + a (x - baseline) are E(baseline) + a (E(x) - E(baseline)). Accumulating the
  quadrature-weighted token gradients and applying P^T once per finding gives exactly the
  input-space IG (the convolution's backward, ~15% of a backward pass, is paid once instead of
  once per path point and finding). Gauss-Legendre quadrature, as Captum's "gausslegendre".
  The path starts at a baseline the model calls normal (fmct.inference.baselines); every map
  records its completeness (sum of attributions against logit(CT) - logit(baseline)), and the
  node count doubles until that holds within COMPLETENESS_TOLERANCE (or MAX_IG_STEPS is reached).
- Occlusion: for one finding, Captum's Occlusion (it does exactly that job); for several, one
  pass over the occluded inputs gives every finding's logits at once (Captum: one pass each).
- Attention maps are finding-agnostic: computed once, the same map whatever the finding.

Captum's IntegratedGradients cannot share the forward across findings (`attribute(target=...)`
takes one target per input example; K findings means K copies of the path), so FMCT's IG is its
own, and `explain_captum` (Captum's IG with the same baseline) is the reference it is tested against.

`explain_study` returns each finding's positive attribution, smoothed, in its own units (not
normalised: the maps of one study share one scale, see fmct.inference.analyze); `explain_findings`
scales each to a maximum of 1. The Preprocessor maps them back onto the CT's grid. torch is imported
by this module: import it only when explaining.
"""
from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from fmct.models import FMCTClassifier
from fmct.conventions.runtime import CancelCheck, Progress, check_cancel, check_explain_method, sub_progress

# 16 Gauss-Legendre nodes to start with, kept by measurement (benchmarks/RESULTS.md#saliency-quality:
# with the normal-head baseline 5 of 6 maps are complete within 5% at 16 nodes, 6 of 6 at 32). The IG
# integrand of a ViT is rough, so a fixed node count does not guarantee completeness (up to 364% off at
# 16 nodes with the all-air baseline in the same run): the product's maps (explain_study with
# ig_steps=None) double the nodes until the attributions sum to logit(CT) - logit(baseline) within
# COMPLETENESS_TOLERANCE, up to MAX_IG_STEPS, and say so in findings.json when the cap is reached.
DEFAULT_IG_STEPS = 16
MAX_IG_STEPS = 64
COMPLETENESS_TOLERANCE = 0.05  # |sum of attributions - logit difference| / |logit difference|
LOGIT_FLOOR = 0.1  # a logit difference below this is judged against this (a relative error of ~0 / ~0 is noise)


@dataclass
class FindingAttribution:
    """One finding's map and how far it can be trusted.

    saliency: the positive part of the attribution summed over channels and lightly smoothed, in the
    attribution's own units (logit per voxel for IG and occlusion; attention weights for attention),
    NOT normalised, so maps of one study can share one scale. completeness (IG only): the sum of all
    attributions against logit(CT) - logit(baseline), the node count used, and whether the error met
    the tolerance.
    """

    task: int
    saliency: np.ndarray
    completeness: dict | None = None

    @property
    def peak(self) -> float:
        return float(self.saliency.max()) if self.saliency.size else 0.0


@dataclass
class Explanation:
    method: str
    findings: list[FindingAttribution] = field(default_factory=list)
    baseline_logits: list[float] | None = None  # IG: the model's logit of each explained finding at the baseline


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
    baseline: torch.Tensor | None = None,
) -> list[np.ndarray]:
    """Saliency of each listed finding's logit for one input x [1, C, D, H, W], each map scaled to a maximum of 1.

    The fixed-node form (ig_steps defaults to DEFAULT_IG_STEPS; baseline to zeros) of explain_study,
    which the product uses: see there for the arguments.
    """
    ex = explain_study(model, x, task_indices, method, progress, cancel, ig_steps or DEFAULT_IG_STEPS, names,
                       batch_size, baseline)
    return [_normalise(f.saliency) for f in ex.findings]


def explain_study(
    model: FMCTClassifier,
    x: torch.Tensor,
    task_indices: Sequence[int],
    method: str = "integrated_gradients",
    progress: Progress | None = None,
    cancel: CancelCheck | None = None,
    ig_steps: int | None = None,
    names: Sequence[str] | None = None,
    batch_size: int | None = None,
    baseline: torch.Tensor | None = None,
    max_steps: int = MAX_IG_STEPS,
    tolerance: float = COMPLETENESS_TOLERANCE,
) -> Explanation:
    """Each listed finding's attribution for one input x [1, C, D, H, W], sharing the model work.

    One FindingAttribution per entry of task_indices, in order. IG: baseline is the input the path
    starts from (default zeros, air; the product passes fmct.inference.baselines' normal head);
    ig_steps=None adapts the node count (DEFAULT_IG_STEPS, doubled for the findings whose completeness
    error exceeds tolerance, up to max_steps); a number fixes it. progress(fraction, message) is called
    per batch and per finding ("explaining <name>", names defaulting to "finding <index>"); cancel()
    is checked before every forward batch and every backward pass.
    """
    check_explain_method(method)
    targets = [int(t) for t in task_indices]
    ex = Explanation(method)
    if not targets:
        return ex
    labels = list(names) if names is not None else [f"finding {t}" for t in targets]
    if method.startswith("attention"):
        check_cancel(cancel, "Explanation")
        notify = sub_progress(progress, 0.0, 1.0)
        notify(0.0, "explaining (attention)")
        m = attention_map(model, x, rollout=method == "attention_rollout")
        notify(1.0, "explaining (attention)")
        ex.findings = [FindingAttribution(t, m.copy()) for t in targets]
        return ex
    batch = batch_size or _batch(x)
    with _frozen(model):
        if method == "integrated_gradients":
            base = torch.zeros_like(x) if baseline is None else baseline.to(x.device, x.dtype).reshape(x.shape)
            attr, ex.baseline_logits, completeness = _adaptive_ig(
                model, x, base, targets, labels, ig_steps, max_steps, tolerance, batch, progress, cancel)
        elif len(targets) == 1:  # one finding: Captum's Occlusion does exactly this job
            attr, completeness = [_captum_occlusion(model, x, targets[0], batch, progress, cancel)], [None]
        else:  # several: one pass over the occluded inputs gives every finding's logits (Captum: one pass each)
            attr, completeness = _occlusion(model, x, targets, labels, batch, progress, cancel), [None] * len(targets)
    # Evidence for the finding only: voxels whose HU (all windows together) raise its logit.
    # Keeping the positive part doubles the share of saliency inside lesions compared with |attr|
    # (measured on phantoms with the demo model: enrichment 15.9 vs 8.8).
    ex.findings = [FindingAttribution(t, _positive_map(a), c) for t, a, c in zip(targets, attr, completeness)]
    return ex


def _positive_map(attribution: torch.Tensor) -> np.ndarray:
    """[C, D, H, W] attribution -> the smoothed positive part of its channel sum, [D, H, W] float32."""
    t = _smooth(attribution.sum(dim=0)[None, None].clamp(min=0).float())[0, 0]
    return np.maximum(t.detach().cpu().numpy().astype(np.float32), 0)


def _adaptive_ig(model, x, baseline, targets, labels, ig_steps, max_steps, tolerance, batch, progress, cancel):
    """IG for every target; with ig_steps None, more nodes for the targets whose completeness fails.

    Returns the attributions [C, D, H, W] per target, the baseline's logits per target and a
    completeness record per target.
    """
    with torch.no_grad():
        ends = model(torch.cat([x, baseline]))[:, targets].float()
    delta = (ends[0] - ends[1]).tolist()
    steps = ig_steps or DEFAULT_IG_STEPS
    cap = steps if ig_steps else max(max_steps, steps)
    schedule = [steps * 2 ** i for i in range(32) if steps * 2 ** i <= cap]  # the passes there may be
    attr: list[torch.Tensor | None] = [None] * len(targets)
    records: list[dict | None] = [None] * len(targets)
    todo, spent = list(range(len(targets))), 0
    while todo:  # progress: each pass fills its share of the worst case; a pass that settles all jumps to the end
        part = sub_progress(progress, spent / sum(schedule), (spent + steps) / sum(schedule))
        found = _integrated_gradients(model, x, baseline, [targets[k] for k in todo], [labels[k] for k in todo],
                                      steps, batch, part, cancel)
        spent += steps
        for k, a in zip(todo, found):
            total = float(a.sum())
            error = abs(total - delta[k]) / max(abs(delta[k]), LOGIT_FLOOR)
            attr[k] = a
            records[k] = {"sum_of_attributions": round(total, 5), "logit_difference": round(delta[k], 5),
                          "relative_error": round(error, 4), "nodes": steps, "tolerance": tolerance,
                          "converged": error <= tolerance}
        todo = [k for k in todo if not records[k]["converged"]] if steps * 2 <= cap else []
        steps *= 2
    sub_progress(progress, 0.0, 1.0)(1.0, f"explaining {labels[-1]}")
    return attr, ends[1].tolist(), records


def _integrated_gradients(model, x, baseline, targets, labels, n_steps, batch, progress, cancel) -> list[torch.Tensor]:
    """Per target, the IG attribution [C, D, H, W] from baseline to x over n_steps Gauss-Legendre nodes."""
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
    notify = sub_progress(progress, 0.0, 1.0)
    n_batches = -(-n_steps // batch)
    units, done = n_batches * (1 + len(targets)), 0
    for start in range(0, n_steps, batch):
        a, w = alphas[start:start + batch], weights[start:start + batch]
        check_cancel(cancel, "Explanation")
        with torch.enable_grad():
            out, path = point(a)
            done += 1
            notify(done / units, f"explaining {labels[0]}")
            w = w.view((-1,) + (1,) * (path.dim() - 1))
            for k, t in enumerate(targets):
                check_cancel(cancel, "Explanation")
                (grad,) = torch.autograd.grad(out[:, t].sum(), path, retain_graph=k < len(targets) - 1)
                acc[k] += (grad * w).sum(dim=0)
                done += 1
                notify(done / units, f"explaining {labels[k]}")
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
    notify = sub_progress(progress, 0.0, 1.0)
    check_cancel(cancel, "Explanation")
    with torch.no_grad():
        ref = model(x)[0, targets]  # [K]
        notify(1 / units, f"explaining {', '.join(labels)}")
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
            notify((n + 2) / units, f"explaining {', '.join(labels)}")
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
    baseline: torch.Tensor | None = None,
) -> np.ndarray:
    """Captum's IntegratedGradients / Occlusion for one finding, scaled to a maximum of 1: the reference
    FMCT's own shared maps are tested against (and how every map was made before explain_findings)."""
    if method == "occlusion":
        return _normalise(_positive_map(_captum_occlusion(model, x, task_index, _batch(x), None, cancel)))
    if method != "integrated_gradients":
        raise ValueError(f"explain_captum covers integrated_gradients and occlusion, not {method}")
    from captum.attr import IntegratedGradients

    def forward(inp: torch.Tensor) -> torch.Tensor:
        check_cancel(cancel, "Explanation")
        return model(inp)[:, task_index]

    base = torch.zeros_like(x) if baseline is None else baseline.to(x.device, x.dtype).reshape(x.shape)
    with torch.enable_grad():
        attr = IntegratedGradients(forward).attribute(x, baselines=base, n_steps=ig_steps,
                                                      internal_batch_size=_batch(x), method="gausslegendre")
    return _normalise(_positive_map(attr[0]))


def _captum_occlusion(model, x, task_index, batch, progress, cancel) -> torch.Tensor:
    """Captum's Occlusion of one finding's logit, [C, D, H, W]: each window (all channels, 2x2x2 patches,
    half overlapping) replaced by 0; a voxel gets the mean logit drop over the windows covering it."""
    from captum.attr import Occlusion

    window, stride = _occlusion_window(model)
    n_windows = math.prod(len(range(0, s - w + 1, st)) for s, w, st in zip(x.shape[2:], window, stride))
    units, done = 1 + -(-n_windows // batch), [0]
    notify = sub_progress(progress, 0.0, 1.0)

    def forward(inp: torch.Tensor) -> torch.Tensor:
        check_cancel(cancel, "Explanation")
        out = model(inp)[:, task_index]
        done[0] += 1
        notify(done[0] / units, "explaining (occlusion)")
        return out

    with torch.no_grad():
        attr = Occlusion(forward).attribute(x, sliding_window_shapes=(x.shape[1], *window),
                                            strides=(x.shape[1], *stride), baselines=0.0,
                                            perturbations_per_eval=batch)
    return attr[0]


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


def _normalise(t: torch.Tensor | np.ndarray) -> np.ndarray:
    """A non-negative map scaled to a maximum of 1 (a copy)."""
    a = (t.detach().cpu().numpy() if isinstance(t, torch.Tensor) else np.asarray(t)).astype(np.float32)
    a = np.maximum(a, 0)
    peak = float(a.max())
    return a / peak if peak > 0 else a

