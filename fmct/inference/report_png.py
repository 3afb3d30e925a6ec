"""A one-page PNG report: axial slices with the saliency overlay, and probability bars.

Slices are shown in the radiological view whatever the file's storage order: anterior up, the
patient's right on the image's left, inferior to superior from left to right. Contains no patient
data: only the findings, the slices and the model's name.
"""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

SALIENCY_LEVELS = (0.25, 0.5, 0.75)  # outline levels, as shares of the saliency's maximum

if TYPE_CHECKING:
    from fmct.inference.results import AnalysisResult
    from fmct.reading.volume import Volume


def write_report(ct: Volume, result: AnalysisResult, path: str | Path, model_name: str = "", n_slices: int = 4) -> Path:
    """Slices through the most salient region of the primary finding, plus all probabilities."""
    fig = report_figure(ct, result, model_name, n_slices)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    return path


def report_figure(ct: Volume, result: AnalysisResult, model_name: str = "", n_slices: int = 4):
    """The report as a matplotlib Figure (write_report saves it; tests inspect it).

    The saliency is drawn as outlines (contours at 25, 50 and 75% of its maximum) with a colour bar
    for their levels, not as a filled heat map: the finding it explains stays visible under it.
    """
    # matplotlib only here, and its object API without pyplot (no GUI backend machinery): importing
    # pyplot was most of the report's cost on a cold start
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    primary = result.primary_finding()
    focus = primary.name if primary else None
    if "attention" in result.saliency:  # the one finding-agnostic map (fmct.inference.saliency)
        focus = "attention"
    view, aspect = radiological_view(ct)
    sal_view = radiological_view(result.saliency[focus])[0] if focus in result.saliency else None
    slices = _pick_slices(view, sal_view, n_slices)
    fig = Figure(figsize=(4 * n_slices, 8.5), dpi=80)
    FigureCanvasAgg(fig)
    grid = fig.add_gridspec(2, n_slices, height_ratios=[1.0, 0.9])
    shown = None
    for col, k in enumerate(slices):
        ax = fig.add_subplot(grid[0, col])
        ct_image = ax.imshow(view[k], cmap="gray", vmin=0, vmax=80, aspect=aspect)
        if sal_view is not None and _unit(sal_view[k]).max() >= SALIENCY_LEVELS[0]:
            shown = ax.contour(_unit(sal_view[k]), levels=SALIENCY_LEVELS, cmap="autumn", vmin=0, vmax=1, linewidths=1.2)
        ax.set_title(f"axial {k + 1}/{view.shape[0]} (inferior to superior)", fontsize=10)
        ax.text(0.02, 0.5, "R", color="yellow", transform=ax.transAxes, va="center", fontsize=12)
        ax.text(0.5, 0.98, "A", color="yellow", transform=ax.transAxes, ha="center", va="top", fontsize=12)
        ax.axis("off")
    if shown is not None:
        bar = fig.colorbar(shown, ax=ax, fraction=0.046, pad=0.02)
        bar.set_label("attention (share of its maximum)" if focus == "attention" else
                      "saliency (share of the strongest attribution among this CT's maps)")
    else:
        fig.colorbar(ct_image, ax=ax, fraction=0.046, pad=0.02).set_label("HU (window 0-80)")
    _bars(fig.add_subplot(grid[1, :]), result)
    banner = getattr(result, "banner", "")
    fig.suptitle(_heading(model_name, focus, result.method if sal_view is not None else None)
                 + "\nResearch use only. Not for diagnosis." + (f" {banner}" if banner else ""), fontsize=12)
    checks = getattr(result, "checks", None)
    if checks is not None:  # one line: every check of the CT, passed or not (fmct.checks)
        fig.text(0.5, 0.005, "Checks: " + "; ".join(f"{c.name} {'ok' if c.passed else 'FLAGGED'}" for c in checks.checks),
                 ha="center", va="bottom", fontsize=8)
    if result.warning:
        fig.text(0.5, 0.5, result.warning, ha="center", va="center", color="white", fontsize=11,
                 bbox={"facecolor": "#b00020", "edgecolor": "none", "pad": 6})
    fig.tight_layout()
    return fig


def _heading(model_name: str, focus: str | None, method: str | None) -> str:
    """The title: which finding the outlines explain and by which method; none named without a map."""
    heading = f"FMCT {model_name}".strip()
    if focus == "attention" and method:
        return f"{heading} - outlines: attention ({method}), finding-agnostic, normalised on its own"
    if focus and method:
        return f"{heading} - saliency outlines: {focus} ({method}), on the scale shared by this CT's maps"
    if focus:
        return f"{heading} - slices through the centre (no saliency map computed)"
    return heading


def radiological_view(volume: Volume) -> tuple[np.ndarray, float]:
    """The voxels as axial images in the radiological convention, and the pixel aspect ratio.

    The LPS canonical view (a lossless permutation and flip, no copy) already is that convention
    when drawn with row 0 at the top: rows run anterior to posterior, columns from the patient's
    right to left, and slices inferior to superior.
    """
    from fmct.preprocessing.preprocessor import canonical_view, orientation_direction

    canonical = canonical_view(volume, orientation_direction("LPS"))
    return canonical.array, canonical.spacing[1] / canonical.spacing[0]


def _unit(saliency: np.ndarray) -> np.ndarray:
    """A map in [0, 1], whether it is float or uint8 0..255 (what Analyzer.map_back gives)."""
    from fmct.inference.results import SALIENCY_MAX

    return saliency / np.float32(SALIENCY_MAX) if saliency.dtype == np.uint8 else saliency


def _pick_slices(view: np.ndarray, sal: np.ndarray | None, n: int) -> list[int]:
    """n axial slices around the one that holds the most of the shown finding's saliency."""
    depth = view.shape[0]
    if sal is not None and sal.max() > 0:
        per_slice = sal.reshape(depth, -1).sum(1)
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
