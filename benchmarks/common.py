"""Shared pieces of the benchmarks: the machine, timing, test CTs, a demo-sized bundle.

Benchmarks are run by hand (never by pytest): `python benchmarks/<name>.py --help`.
Every script measures its own baseline in the same run and prints ratios against it, and can
write its numbers as JSON (--json) for benchmarks/RESULTS.md.
"""
from __future__ import annotations

import json
import os
import platform
import shutil
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402


def set_threads(n: int | None) -> int:
    """Limit every thread pool (torch, SimpleITK, onnxruntime via OMP) to n cores, as on a 2-core laptop."""
    n = n or os.cpu_count() or 1
    os.environ["OMP_NUM_THREADS"] = str(n)
    import SimpleITK as sitk
    import torch

    torch.set_num_threads(n)
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(n)
    return n


def machine(device: str = "cpu", threads: int | None = None) -> dict[str, Any]:
    """What ran the benchmark, for RESULTS.md."""
    import torch

    cpu = platform.processor() or ""
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    info = {"cpu": cpu, "cpu_count": os.cpu_count(), "threads": threads, "python": platform.python_version(),
            "torch": torch.__version__, "device": device,
            "load_avg_1min_at_start": round(os.getloadavg()[0], 2)}  # other work on a shared host skews CPU timings
    if device.startswith("cuda") and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info


def sync(device: str) -> None:
    if device.startswith("cuda"):
        import torch

        torch.cuda.synchronize()


def timeit(fn: Callable[[], Any], device: str = "cpu", warmup: int = 1, repeat: int = 5, min_time: float = 0.0) -> float:
    """Median seconds of fn() after warm-up (repeats at least `repeat` times and `min_time` seconds)."""
    for _ in range(warmup):
        fn()
    sync(device)
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < repeat or time.perf_counter() - start < min_time:
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def head_ct(kind: str, seed: int = 0):
    """A synthetic head CT with a subdural hematoma, as a scanner would reconstruct it.

    thick: 512 x 512 x 40 at 5 mm; thin: 512 x 512 x 300 at 0.625 mm (fmct.phantom resampled along z,
    air beyond the head).
    """
    import SimpleITK as sitk

    from fmct.phantom import make_phantom
    from fmct.reading.volume import Volume

    slices, dz = {"thick": (40, 5.0), "thin": (300, 0.625)}[kind]
    ph = make_phantom(seed, findings=["subdural"], slices="thick" if kind == "thick" else "thin", in_plane_size=512)
    img = ph.volume.to_sitk()
    sx, sy, _ = img.GetSpacing()
    centre_z = img.TransformContinuousIndexToPhysicalPoint([0, 0, (img.GetSize()[2] - 1) / 2])[2]
    origin = list(img.GetOrigin())
    origin[2] = centre_z - dz * (slices - 1) / 2
    out = sitk.Resample(img, [512, 512, slices], sitk.Transform(), sitk.sitkLinear, origin, [sx, sy, dz],
                        img.GetDirection(), -1024.0, sitk.sitkFloat32)
    arr = np.rint(sitk.GetArrayFromImage(out)).astype(np.float32)
    return Volume(arr, (sx, sy, dz), tuple(origin), np.array(img.GetDirection()).reshape(3, 3),
                  {"series_description": f"benchmark {kind}"})


def dicom_study(kind: str, folder: Path, seed: int = 0) -> Path:
    """Write (once) the head CT of `kind` as a DICOM series into folder; returns the folder."""
    from fmct.reading.dicom import write_dicom_series

    done = folder / ".complete"
    if not done.exists():
        shutil.rmtree(folder, ignore_errors=True)
        write_dicom_series(head_ct(kind, seed), folder)
        done.write_text("ok")
    return folder


def _same_file(a: Path, b: Path) -> bool:
    return b.is_file() and a.stat().st_size == b.stat().st_size and a.read_bytes() == b.read_bytes()


def demo_bundle(folder: Path) -> Path:
    """Resources/DemoModel when it exists (copied: exports must not touch it; copied again when the
    shipped model has changed since), else a random model of its size."""
    from fmct.inference.bundle import BundleMeta, Task, save_bundle

    target = folder / "bundle"
    demo = ROOT / "Resources" / "DemoModel"
    shipped = demo / "model.safetensors"
    if target.exists() and (not shipped.is_file() or _same_file(shipped, target / "model.safetensors")):
        return target
    if shipped.is_file():
        shutil.rmtree(target, ignore_errors=True)
        shutil.copytree(demo, target)
        return target
    import torch

    from fmct.models import FMCTClassifier, preset
    from fmct.conventions.tasks import TASKS
    from fmct.preprocessing.spec import PreprocessSpec

    torch.manual_seed(0)
    spec = PreprocessSpec()
    cfg = preset("tiny", img_size=spec.tensor_shape, in_chans=spec.in_channels)
    meta = BundleMeta("benchmark-tiny", cfg, spec,
                      [Task(t, t, threshold=0.5, temperature=1.0) for t in TASKS],
                      description="random weights, demo model size")
    model = FMCTClassifier(cfg, len(TASKS)).eval()
    with torch.no_grad():  # exactly one positive finding, so each CT gets one saliency map
        model.head.fc.bias.fill_(-10.0)
        model.head.fc.bias[0] = 10.0
    return save_bundle(model, meta, target)


def bootstrap_aurocs(y: np.ndarray, arms: list[list[np.ndarray]], n_boot: int, seed: int) -> np.ndarray:
    """[resamples, arms]: each arm's AUROC (mean over its score sets) on the same bootstrap resamples of the cases.

    One resampling for every arm is what makes differences between arms paired: the CI of a column
    difference then reflects the arms, not two unrelated draws of cases. Resamples with one class only
    are skipped (AUROC is undefined there).
    """
    from fmct.features.metrics import auroc

    rng, rows = np.random.default_rng(seed), []
    for _ in range(n_boot):
        idx = rng.integers(0, len(y), len(y))
        if 0 < y[idx].sum() < len(idx):
            rows.append([float(np.mean([auroc(y[idx], s[idx]) for s in scores])) for scores in arms])
    return np.array(rows)


def ci95(values: np.ndarray) -> list[float]:
    """The 2.5 and 97.5 percentiles, rounded as RESULTS.md shows them."""
    return [round(float(np.percentile(values, 2.5)), 4), round(float(np.percentile(values, 97.5)), 4)]


def emit(results: dict[str, Any], path: str | None) -> None:
    """Write the results as JSON to path, or print them when no path is given."""
    text = json.dumps(results, indent=2, default=float)
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(text)
        print(f"wrote {path}")
    else:
        print(text)
