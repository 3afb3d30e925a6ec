"""Know when not to answer: how far a CT's encoder features lie from the model's training data.

A bundle may carry `ood.safetensors`: the mean and a shrunk inverse covariance of the pooled
encoder features (the head's input: CLS and mean patch token) over reference CTs from the training
distribution, and a threshold calibrated on held-out CTs of that distribution. A CT's score is its
squared Mahalanobis distance to the reference divided by the feature dimension. The raw number has
no fixed scale (the shrinkage damps the feature directions the reference barely varies in); what
decides is the threshold, the score below which a chosen share of held-out training-distribution CTs
fall. Above it the findings are flagged unreliable.
Mahalanobis on these features is the standard baseline (Lee et al. 2018) and needs nothing beyond
numpy at run time, so the onnxruntime path can use it too.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

import numpy as np

from fmct.inference.bundle import OOD_FILE, WEIGHTS_FILE, Bundle, read_members
from fmct.conventions.errors import BundleError

FEATURE = "cls+mean_patch"  # what the statistics describe: the task head's input
DEFAULT_QUANTILE = 0.975  # share of held-out in-distribution CTs that stay below the threshold
SHRINKAGE = 0.1  # the fixed shrinkage of statistics written before issue 26 (their metadata has no 'shrinkage')


@dataclass
class ReferenceStats:
    """What `score` needs: the reference mean, the shrunk precision matrix and the threshold."""

    mean: np.ndarray  # [D]
    precision: np.ndarray  # [D, D]
    threshold: float
    quantile: float
    n_reference: int
    n_calibration: int
    source: str = ""  # where the reference and calibration CTs came from, for the record
    shrinkage: float = SHRINKAGE  # of the covariance towards its mean variance (Ledoit-Wolf estimate since issue 26)
    # Relative margin below the threshold a score must keep to be "in distribution": measured as how far benign
    # rescans of one CT (noise, a few degrees, thicker slices, a shorter field of view) move its score, so a CT
    # flagged by a hair does not turn "in distribution" with a little noise. 0: the bare threshold.
    margin: float = 0.0

    def score(self, features: np.ndarray) -> np.ndarray:
        """Squared Mahalanobis distance per feature dimension, one value per row of features [B, D]."""
        features = np.atleast_2d(np.asarray(features, dtype=np.float64))
        if features.shape[1] != self.mean.shape[0]:
            raise BundleError(f"{OOD_FILE} describes {self.mean.shape[0]} features but the model gives "
                              f"{features.shape[1]}; it belongs to another model. Recompute it (fmct finetune writes it).")
        centred = features - self.mean
        return np.einsum("bi,ij,bj->b", centred, self.precision, centred) / self.mean.shape[0]

    def judge(self, features: np.ndarray) -> dict[str, Any]:
        """The record analyze reports for one CT: score, threshold and the verdict.

        Whether the head is whole (not a partial scan, not a child's head) is no longer judged here but by
        the model-independent size check (fmct.checks.size), which refuses such a CT before the model runs.
        """
        score = float(self.score(features)[0])
        if not np.isfinite(score):
            raise BundleError("the out-of-distribution score is not finite; the model's features are broken")
        limit = self.threshold * (1.0 - self.margin)
        record = {"score": round(score, 4), "threshold": round(self.threshold, 4),
                  "in_distribution": score <= limit,
                  "method": f"mahalanobis on {FEATURE} (covariance shrinkage {self.shrinkage:.3g}), threshold at the "
                            f"{self.quantile:g} quantile of {self.n_calibration} held-out training-distribution CTs"}
        if self.margin > 0:
            record.update(margin=round(self.margin, 4), in_distribution_below=round(limit, 4),
                          borderline=bool(limit < score <= self.threshold))
            record["method"] += f"; in distribution only {100 * self.margin:.0f}% below it (the measured spread of benign rescans)"
        return record

    def to_bytes(self, weights_sha256: str) -> bytes:
        """safetensors bytes, tied to the weights they were computed with (by their SHA-256)."""
        from safetensors.numpy import save

        metadata = {"feature": FEATURE, "threshold": repr(float(self.threshold)), "quantile": repr(float(self.quantile)),
                    "n_reference": str(self.n_reference), "n_calibration": str(self.n_calibration),
                    "weights_sha256": weights_sha256, "source": self.source, "shrinkage": repr(float(self.shrinkage)),
                    "margin": repr(float(self.margin))}
        return save({"mean": self.mean.astype(np.float64), "precision": self.precision.astype(np.float64)}, metadata)

    @classmethod
    def from_bytes(cls, data: bytes, where: str = OOD_FILE, weights_sha256: str | None = None) -> "ReferenceStats":
        """Read and check the statistics: right tensors, finite, a square precision matrix, a finite threshold,
        and (when weights_sha256 is given) computed with exactly these weights."""
        from safetensors.numpy import load

        try:
            tensors, metadata = load(data), _safetensors_metadata(data)
            mean, precision = tensors["mean"], tensors["precision"]
        except Exception as e:  # safetensors raises its own types for corrupt files; KeyError for a missing tensor
            raise BundleError(f"{where} is not a readable set of reference statistics ({e!r}); recompute it") from e
        try:
            threshold, quantile = float(metadata["threshold"]), float(metadata["quantile"])
            n_ref, n_cal = int(metadata["n_reference"]), int(metadata["n_calibration"])
        except (KeyError, ValueError) as e:
            raise BundleError(f"{where}: metadata field {e} is missing or not a number; recompute it") from e
        if weights_sha256 is not None and metadata.get("weights_sha256") != weights_sha256:
            raise BundleError(f"{where} was computed with other weights than {WEIGHTS_FILE} (stale statistics); "
                              "recompute them for these weights (fmct finetune writes them).")
        d = mean.shape[0] if mean.ndim == 1 else -1
        if d < 1 or precision.shape != (d, d):
            raise BundleError(f"{where}: 'mean' {mean.shape} and 'precision' {precision.shape} do not fit together")
        if not (np.isfinite(mean).all() and np.isfinite(precision).all() and np.isfinite(threshold) and threshold > 0):
            raise BundleError(f"{where} holds non-finite values or a threshold that is not positive; recompute it")
        try:
            shrinkage, margin = float(metadata.get("shrinkage", SHRINKAGE)), float(metadata.get("margin", 0.0))
        except ValueError as e:
            raise BundleError(f"{where}: metadata field 'shrinkage' or 'margin' is not a number; recompute it") from e
        if not (0.0 <= margin < 1.0 and 0.0 <= shrinkage <= 1.0):
            raise BundleError(f"{where}: 'margin' {margin} or 'shrinkage' {shrinkage} is outside [0, 1); recompute it")
        return cls(mean, precision, threshold, quantile, n_ref, n_cal, str(metadata.get("source", "")), shrinkage,
                   margin)


def _safetensors_metadata(data: bytes) -> dict[str, str]:
    """The __metadata__ of a safetensors file: its header is an 8-byte length and then JSON."""
    import json
    import struct

    (n,) = struct.unpack("<Q", data[:8])
    return dict(json.loads(data[8:8 + n]).get("__metadata__") or {})


def ledoit_wolf_shrinkage(x: np.ndarray) -> float:
    """The Ledoit-Wolf (2004) estimate of the optimal shrinkage of the covariance of x [N, D] towards
    mu * I (mu its mean variance), in closed form: the share of the sample covariance's error that is noise.

    A fixed value (the 0.1 used before) was never measured; on a few hundred CTs of a few hundred feature
    dimensions the estimate is several times larger, which keeps the score from over-weighting the directions
    the reference barely varies in (where a benign change, such as noise, looks like a large distance).
    """
    x = np.asarray(x, dtype=np.float64)
    x = x - x.mean(axis=0)
    n, p = x.shape
    s = x.T @ x / n
    mu = np.trace(s) / p
    delta = (np.sum(s * s) - 2 * mu * np.trace(s) + p * mu * mu) / p  # ||S - mu I||_F^2 / p
    x2 = x * x
    beta = (np.sum(x2.T @ x2) / n - np.sum(s * s)) / (n * p)  # (1/n^2) sum_k ||x_k x_k^T - S||_F^2 / p
    if delta <= 0:
        return 1.0
    return float(min(max(beta, 0.0), delta) / delta)


def oas_shrinkage(cov: np.ndarray, n: int) -> float:
    """The Oracle Approximating Shrinkage (Chen et al. 2010) of a sample covariance [D, D] of n samples towards
    mu * I: closed form in the covariance alone, so statistics stored without their samples can be re-shrunk."""
    p = cov.shape[0]
    mu = np.trace(cov) / p
    alpha = np.mean(cov * cov)
    den = (n + 1.0) * (alpha - mu * mu / p)
    return 1.0 if den <= 0 else float(min((alpha + mu * mu) / den, 1.0))


def shrunk_precision(cov: np.ndarray, shrinkage: float) -> np.ndarray:
    """The inverse of the covariance shrunk towards its mean variance."""
    target = np.eye(cov.shape[0]) * np.trace(cov) / cov.shape[0]
    return np.linalg.inv((1.0 - shrinkage) * cov + shrinkage * target)


def unshrunk_covariance(precision: np.ndarray, shrinkage: float) -> np.ndarray:
    """The sample covariance back from a precision made by shrunk_precision (the trace is kept by shrinking)."""
    a = np.linalg.inv(precision)
    return (a - shrinkage * np.eye(a.shape[0]) * np.trace(a) / a.shape[0]) / (1.0 - shrinkage)


def fit_reference(reference: np.ndarray, calibration: np.ndarray, quantile: float = DEFAULT_QUANTILE,
                  shrinkage: float | None = None, source: str = "") -> ReferenceStats:
    """Statistics from reference features [N, D], with the threshold set on other CTs' features [M, D].

    The threshold comes from CTs not used for the mean and covariance: scores of the reference CTs
    themselves are biased low (the covariance was fitted to them), which would flag too many new CTs.
    shrinkage None: estimated from the reference (Ledoit-Wolf); a number: that value.
    """
    reference = np.asarray(reference, dtype=np.float64)
    calibration = np.asarray(calibration, dtype=np.float64)
    if reference.ndim != 2 or reference.shape[0] < 2 or calibration.ndim != 2 or calibration.shape[0] < 1:
        raise ValueError("reference needs at least 2 CTs and calibration at least 1, as [N, D] features")
    mean = reference.mean(axis=0)
    shrinkage = ledoit_wolf_shrinkage(reference) if shrinkage is None else float(shrinkage)
    precision = shrunk_precision(np.cov(reference, rowvar=False), shrinkage)
    stats = ReferenceStats(mean, precision, 1.0, quantile, reference.shape[0], calibration.shape[0], source, shrinkage)
    stats.threshold = float(np.quantile(stats.score(calibration), quantile))
    return stats


def load_reference_stats(bundle: Bundle) -> ReferenceStats | None:
    """The bundle's out-of-distribution statistics, checked against its weights; None when it has none."""
    if bundle.path is None:
        return None
    members = read_members(bundle.path, (OOD_FILE,) if bundle.weights_sha256 else (OOD_FILE, WEIGHTS_FILE))
    if OOD_FILE not in members:
        return None
    sha = bundle.weights_sha256 or hashlib.sha256(members[WEIGHTS_FILE]).hexdigest()
    return ReferenceStats.from_bytes(members[OOD_FILE], f"{bundle.path}/{OOD_FILE}", sha)
