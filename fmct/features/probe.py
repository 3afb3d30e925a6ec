"""`fmct probe`: how good are an encoder's features for your labels? kNN and logistic regression
on saved embeddings (`fmct embed`), with stratified cross-validation. Minutes on a CPU, no GPU.

- kNN: cosine similarity on L2-normalised features, the k nearest training studies vote with
  weights exp(similarity / 0.07), as DINO's kNN evaluation does.
- Logistic regression: L2-regularised, on features standardised with the training fold's mean
  and std, fitted by LBFGS (torch, deterministic); the regularisation is chosen per fold by an
  inner split over a small grid, so no test fold informs it.
Per task: AUROC of each fold, their mean and std, and the AUROC of the pooled out-of-fold scores
with a bootstrap 95% CI over studies. Studies without a label for a task are left out of that task.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from fmct.conventions.errors import ConfigError

METHODS = ("knn", "logreg")
L2_GRID = (1e-4, 1e-3, 1e-2, 1e-1, 1.0)


def stratified_folds(y: np.ndarray, n_folds: int, seed: int) -> list[np.ndarray]:
    """Test indices of n_folds folds, positives and negatives dealt out in turn after a seeded shuffle."""
    rng = np.random.default_rng(seed)
    folds: list[list[int]] = [[] for _ in range(n_folds)]
    for value in (1, 0):
        idx = np.flatnonzero(y == value)
        rng.shuffle(idx)
        for j, i in enumerate(idx):
            folds[j % n_folds].append(int(i))
    return [np.array(sorted(f), dtype=int) for f in folds]


def grouped_folds(y: np.ndarray, groups: list[str], n_folds: int, seed: int) -> list[np.ndarray]:
    """stratified_folds over studies (a study is positive when any of its series is), then every series of a
    study goes to its study's fold: no study is on both sides of a split."""
    names = sorted(set(groups))
    index = np.array([names.index(g) for g in groups])
    study_y = np.array([int(y[index == i].max()) for i in range(len(names))])
    return [np.flatnonzero(np.isin(index, f)) for f in stratified_folds(study_y, n_folds, seed)]


def knn_scores(f_train: np.ndarray, y_train: np.ndarray, f_test: np.ndarray, k: int = 20, temperature: float = 0.07) -> np.ndarray:
    a = f_train / np.maximum(np.linalg.norm(f_train, axis=1, keepdims=True), 1e-12)
    b = f_test / np.maximum(np.linalg.norm(f_test, axis=1, keepdims=True), 1e-12)
    sim = b @ a.T  # [test, train]
    k = max(1, min(k, len(a)))
    top = np.argpartition(-sim, k - 1, axis=1)[:, :k]
    s = np.take_along_axis(sim, top, axis=1)
    w = np.exp((s - s.max(axis=1, keepdims=True)) / temperature)
    return (w * y_train[top]).sum(axis=1) / w.sum(axis=1)


def logreg_fit_predict(f_train: np.ndarray, y_train: np.ndarray, f_test: np.ndarray, l2: float) -> np.ndarray:
    """L2 logistic regression on standardised features (LBFGS, float64, deterministic) -> test logits."""
    import torch

    mu, sd = f_train.mean(0), f_train.std(0) + 1e-6
    a = torch.tensor((f_train - mu) / sd, dtype=torch.float64)
    b = torch.tensor((f_test - mu) / sd, dtype=torch.float64)
    yt = torch.tensor(y_train, dtype=torch.float64)
    w = torch.zeros(a.shape[1], dtype=torch.float64, requires_grad=True)
    c = torch.zeros(1, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([w, c], max_iter=200, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = torch.nn.functional.binary_cross_entropy_with_logits(a @ w + c, yt) + l2 * (w ** 2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return (b @ w + c).detach().numpy()


def logreg_scores(f_train: np.ndarray, y_train: np.ndarray, f_test: np.ndarray, seed: int) -> tuple[np.ndarray, float]:
    """Logistic regression with its L2 weight picked on an inner 3-fold split of the training fold."""
    from fmct.features.metrics import auroc

    best, best_l2 = -1.0, L2_GRID[len(L2_GRID) // 2]
    if min(int(y_train.sum()), int((1 - y_train).sum())) >= 3:
        inner = stratified_folds(y_train, 3, seed + 1)
        for l2 in L2_GRID:
            scores = np.zeros(len(y_train))
            for test in inner:
                train = np.setdiff1d(np.arange(len(y_train)), test)
                scores[test] = logreg_fit_predict(f_train[train], y_train[train], f_train[test], l2)
            value = auroc(y_train, scores)
            if value > best + 1e-9:
                best, best_l2 = value, l2
    return logreg_fit_predict(f_train, y_train, f_test, best_l2), best_l2


def select_features(features: dict[str, Any], which: str) -> np.ndarray:
    """'cls', 'patch_mean', 'cls+patch_mean' (default: what a bundle's head reads), or any '+'-joined keys."""
    names = [w.strip() for w in which.split("+") if w.strip()]
    missing = [n for n in names if n not in features or n in ("study_id", "tasks", "labels")]
    if missing:
        known = sorted(k for k in features if k not in ("study_id", "tasks", "labels"))
        raise ConfigError(f"--features {which}: no {missing} in this file; it has {known}")
    return np.concatenate([np.asarray(features[n], dtype=np.float64) for n in names], axis=1)


def labels_from_csv(path: str | Path, ids: list[str]) -> tuple[list[str], np.ndarray]:
    """A labels CSV (a study id column, then 0/1 columns per task) aligned to ids (NaN where missing)."""
    import csv

    from fmct.data.manifests import ID_COLUMNS

    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"labels file not found: {path}")
    with open(path, newline="", encoding="utf-8-sig") as fh:
        reader = csv.DictReader(fh)
        rows = [{k: (v or "").strip() for k, v in row.items() if k is not None} for row in reader]
        columns = [c for c in (reader.fieldnames or []) if c]
    id_col = next((c for c in ID_COLUMNS if c in columns), None)
    if id_col is None:
        raise ConfigError(f"{path}: needs a study id column (one of {', '.join(ID_COLUMNS)})")
    binary = {"0", "1", "0.0", "1.0", ""}
    tasks = [c for c in columns if c not in (id_col, "path") and all(r.get(c, "") in binary for r in rows)]
    by_id = {r[id_col]: r for r in rows}

    def value(row: dict[str, str] | None, task: str) -> float:
        text = (row or {}).get(task, "").strip()
        return float(text) if text in ("0", "1", "0.0", "1.0") else np.nan

    return tasks, np.array([[value(by_id.get(i), t) for t in tasks] for i in ids], dtype=np.float64).reshape(len(ids), len(tasks))


def probe(features_path: str | Path, labels: str | Path | None = None, tasks: list[str] | None = None,
          methods: tuple[str, ...] = METHODS, which: str = "cls+patch_mean", folds: int = 5, k: int = 20,
          seed: int = 0, n_boot: int = 1000) -> dict[str, Any]:
    """Cross-validated kNN / logistic-regression AUROC per task on a features file from `fmct embed`."""
    from fmct.features.embed import read_features
    from fmct.features.metrics import auroc, auroc_ci

    bad = sorted(set(methods) - set(METHODS))
    if bad:
        raise ConfigError(f"--method {bad}: use {', '.join(METHODS)}")
    feats = read_features(features_path)
    x = select_features(feats, which)
    if labels is not None:
        task_names, y_all = labels_from_csv(labels, feats["study_id"])
    else:
        task_names, y_all = list(feats.get("tasks", [])), np.asarray(feats.get("labels", np.zeros((len(x), 0))))
    if not task_names:
        raise ConfigError("no labels: the features file has none (its studies were unlabelled); give --labels LABELS.csv")
    chosen = tasks or task_names
    unknown = [t for t in chosen if t not in task_names]
    if unknown:
        raise ConfigError(f"--tasks {unknown}: the labels have {task_names}")
    report: dict[str, Any] = {"features": str(features_path), "which": which, "dim": int(x.shape[1]), "folds": folds,
                              "seed": seed, "tasks": {}}
    for task in chosen:
        col = y_all[:, task_names.index(task)]
        known = ~np.isnan(col)
        y, f = col[known].astype(int), x[known]
        n_pos, n_neg = int(y.sum()), int(len(y) - y.sum())
        entry: dict[str, Any] = {"n": int(len(y)), "positives": n_pos}
        groups = [g for g, k in zip(feats["study"], known) if k] if "study" in feats else None
        if groups is not None:  # folds are dealt by study: count positive and negative studies
            study_y = {g: 0 for g in groups}
            for g, v in zip(groups, y):
                study_y[g] = max(study_y[g], int(v))
            n_pos, n_neg = sum(study_y.values()), len(study_y) - sum(study_y.values())
            entry.update(studies=len(study_y), positive_studies=n_pos)
        n_folds = min(folds, n_pos, n_neg)
        if n_folds < 2:
            entry["error"] = f"needs at least 2 positives and 2 negatives (has {n_pos} and {n_neg})"
            report["tasks"][task] = entry
            continue
        if groups is not None:  # series of one study stay in one fold
            test_folds = grouped_folds(y, groups, n_folds, seed)
        else:
            test_folds = stratified_folds(y, n_folds, seed)
        for method in methods:
            oof, per_fold, l2s = np.zeros(len(y)), [], []
            for j, test in enumerate(test_folds):
                train = np.setdiff1d(np.arange(len(y)), test)
                if method == "knn":
                    oof[test] = knn_scores(f[train], y[train], f[test], k)
                else:
                    oof[test], l2 = logreg_scores(f[train], y[train], f[test], seed + j)
                    l2s.append(l2)
                if 0 < y[test].sum() < len(test):
                    per_fold.append(auroc(y[test], oof[test]))
            lo, hi = auroc_ci(y, oof, n_boot=n_boot, seed=seed)
            entry[method] = {"auroc_folds": [round(v, 4) for v in per_fold], "auroc_mean": round(float(np.mean(per_fold)), 4),
                             "auroc_std": round(float(np.std(per_fold)), 4), "auroc_pooled": round(float(auroc(y, oof)), 4),
                             "ci95_pooled": [round(float(lo), 4), round(float(hi), 4)]}
            if l2s:
                entry[method]["l2_chosen"] = l2s
        report["tasks"][task] = entry
    return report


def format_report(report: dict[str, Any]) -> str:
    lines = [f"{'task':24} {'n':>5} {'pos':>4} {'method':>7} {'AUROC mean +- std (folds)':>27} {'pooled [95% CI]':>22}"]
    for task, e in report["tasks"].items():
        if "error" in e:
            lines.append(f"{task:24} {e['n']:5d} {e['positives']:4d}  {e['error']}")
            continue
        for method in METHODS:
            if method in e:
                m = e[method]
                lines.append(f"{task:24} {e['n']:5d} {e['positives']:4d} {method:>7} {m['auroc_mean']:>15.3f} +- {m['auroc_std']:.3f}"
                             f" ({len(m['auroc_folds'])})  {m['auroc_pooled']:.3f} [{m['ci95_pooled'][0]:.3f}, {m['ci95_pooled'][1]:.3f}]")
    return "\n".join(lines)


def write_report(report: dict[str, Any], path: str | Path) -> Path:
    from fmct.conventions.atomic import write_text_atomic

    return write_text_atomic(path, json.dumps(report, indent=2))
