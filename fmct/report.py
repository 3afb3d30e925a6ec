"""A one-page PNG report: axial slices with the saliency overlay, and probability bars.

Contains no patient data: only the findings, the slices and the model's name.
"""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from fmct.analyze import AnalysisResult  # noqa: E402
from fmct.volume import Volume  # noqa: E402


def write_report(ct: Volume, result: AnalysisResult, path: str | Path, model_name: str = "", n_slices: int = 4) -> Path:
    """Slices through the most salient region of the primary finding, plus all probabilities."""
    primary = result.primary_finding()
    focus = primary.name if primary else None
    sal = result.saliency.get(focus) if focus else None
    slices = _pick_slices(ct, sal, n_slices)
    fig = plt.figure(figsize=(4 * n_slices, 8.5), dpi=80)
    grid = fig.add_gridspec(2, n_slices, height_ratios=[1.0, 0.9])
    aspect = ct.spacing[1] / ct.spacing[0]
    for col, k in enumerate(slices):
        ax = fig.add_subplot(grid[0, col])
        ax.imshow(ct.array[k], cmap="gray", vmin=0, vmax=80, aspect=aspect)
        if sal is not None:
            overlay = np.ma.masked_less(sal.array[k], 0.2)
            ax.imshow(overlay, cmap="hot", vmin=0, vmax=1, alpha=0.55, aspect=aspect)
        ax.set_title(f"slice {k + 1}/{ct.array.shape[0]}", fontsize=10)
        ax.axis("off")
    ax = fig.add_subplot(grid[1, :])
    _bars(ax, result)
    heading = f"FMCT {model_name}".strip()
    if focus:
        heading += f" - overlay: {focus} ({result.method})"
    fig.suptitle(heading + "\nResearch use only. Not for diagnosis.", fontsize=12)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


def _pick_slices(ct: Volume, sal: Volume | None, n: int) -> list[int]:
    depth = ct.array.shape[0]
    if sal is not None and sal.array.max() > 0:
        per_slice = sal.array.reshape(depth, -1).sum(1)
        centre = int(np.argmax(per_slice))
    else:
        centre = depth // 2
    step = max(1, depth // (4 * n))
    ks = [min(max(centre + (i - n // 2) * step, 0), depth - 1) for i in range(n)]
    return sorted(set(ks))


def _bars(ax, result: AnalysisResult) -> None:
    names = [f.name for f in result.findings][::-1]
    probs = [f.probability for f in result.findings][::-1]
    thresholds = [f.threshold for f in result.findings][::-1]
    colours = ["#d62728" if f.positive else "#7f7f7f" for f in result.findings][::-1]
    y = np.arange(len(names))
    ax.barh(y, probs, color=colours)
    ax.scatter(thresholds, y, marker="|", s=300, color="black", label="threshold")
    ax.set_yticks(y, names)
    ax.set_xlim(0, 1)
    ax.set_xlabel("probability (calibrated)")
    for yi, p in zip(y, probs):
        ax.text(min(p + 0.01, 0.93), yi, f"{p:.2f}", va="center", fontsize=9)
    ax.legend(loc="lower right")
