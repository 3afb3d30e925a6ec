"""Cost that grows with the work, not the file: read, preprocess, map back and write, by CT size.

Three CTs: 5 mm (512x512x40), thin (512x512x300) and very large (1024x1024x1000, 2 GB int16).
Each stage is timed in a fresh process per CT, whose peak RSS is reported (beyond the imports)
against the int16 size of the input. Reading is timed from the ways a CT arrives: uncompressed
int16 NIfTI (a streaming copy), gzipped NIfTI and, for the 5 mm and thin CTs, a DICOM series.
The baseline in the same run is the map back fmct used before fmct.preprocessing.separable: ITK's linear
resampling straight into uint8 (`fmct.preprocessing.preprocessor.itk_resample`, still the path for oblique CTs),
and a study folder of four maps written one file at a time (fmct now writes them several at once);
preprocessing and the single map's write are the same code in both processes.
Ratios above 1: fmct's path is faster / smaller. The mapping back and writing of one saliency map
should cost far less than reading the CT.

    python benchmarks/bench_scaling.py                 # all three (the large one needs ~8 GB of RAM and 6 GB disk)
    python benchmarks/bench_scaling.py --kinds thick thin
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from common import emit, head_ct, machine

SHAPES = {"thick": (40, 512, 512), "thin": (300, 512, 512), "large": (1000, 1024, 1024)}


def write_ct(kind: str, folder: Path) -> dict[str, Path]:
    """The benchmark CT of `kind` as an uncompressed int16 NIfTI (the large one upsampled from the thin
    one), the same as .nii.gz and, but for the large one, as a DICOM series: {format: path}."""
    import SimpleITK as sitk

    from fmct.reading.dicom import write_dicom_series
    from fmct.reading.files import read_volume

    path = folder / f"{kind}.nii"
    paths = {"nii": path, "nii.gz": folder / f"{kind}.nii.gz"}
    if kind != "large":
        paths["dicom"] = folder / f"{kind}_dicom"
    if not path.exists():
        _write_nii(kind, path)
    if not paths["nii.gz"].exists():
        sitk.WriteImage(sitk.ReadImage(str(path)), str(paths["nii.gz"]), useCompression=True)
    if "dicom" in paths and not (paths["dicom"] / ".complete").exists():
        write_dicom_series(read_volume(path), paths["dicom"])
        (paths["dicom"] / ".complete").write_text("ok")
    return paths


def _write_nii(kind: str, path: Path) -> None:
    import SimpleITK as sitk

    base = head_ct("thin" if kind == "large" else kind)
    image = base.to_sitk()
    if kind == "large":
        nz, ny, nx = SHAPES[kind]
        size = image.GetSize()
        spacing = [image.GetSpacing()[0] * size[0] / nx, image.GetSpacing()[1] * size[1] / ny,
                   image.GetSpacing()[2] * size[2] / nz]
        image = sitk.Resample(image, [nx, ny, nz], sitk.Transform(), sitk.sitkLinear, image.GetOrigin(), spacing,
                              image.GetDirection(), -1024.0, sitk.sitkInt16)
    else:
        image = sitk.Cast(image, sitk.sitkInt16)
    sitk.WriteImage(image, str(path), useCompression=False)


def peak_rss_mb() -> float:
    """This process's peak RSS (VmHWM: unlike ru_maxrss it is not inherited from the parent across exec)."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM")) / 1024


def run_stages(paths: dict[str, str], mode: str) -> dict:
    """In this (fresh) process: each stage once, its seconds, and the peak RSS."""
    from fmct.inference.bundle import default_bundle_path, read_bundle
    from fmct.inference.analyze import AnalysisResult
    from fmct.reading.files import read_volume, write_volume
    from fmct.inference.study_folder import quantize_saliency, write_study_outputs
    from fmct.preprocessing.preprocessor import Preprocessor, itk_resample
    from fmct.reading.volume import Volume

    spec = read_bundle(default_bundle_path())[0].preprocessing
    pre = Preprocessor(spec)
    out: dict = {"rss_after_imports_mb": peak_rss_mb()}
    t = time.perf_counter()
    volume = read_volume(paths["nii"])
    out["read_s"] = time.perf_counter() - t
    out["rss_after_read_mb"] = peak_rss_mb()
    t = time.perf_counter()
    mi = pre(volume)
    out["preprocess_s"] = time.perf_counter() - t
    model_map = mi.array[0, 0] / max(float(mi.array[0, 0].max()), 1e-6)
    t = time.perf_counter()
    if mode == "fmct":  # what Analyzer.map_back does
        back = pre.to_input_grid(model_map, mi, levels=255)
    else:  # before: ITK's resampling straight into uint8
        grid = mi.input_grid
        back = Volume(itk_resample(model_map, mi.model_grid, grid, 255), grid.spacing, grid.origin, grid.direction)
    out["map_back_s"] = time.perf_counter() - t
    with tempfile.TemporaryDirectory() as tmp:
        t = time.perf_counter()
        write_volume(quantize_saliency(back), Path(tmp) / "saliency.nii.gz")
        out["write_map_s"] = time.perf_counter() - t
        # A study's folder with four maps, as `fmct analyze` writes it (before: one file at a time).
        result = AnalysisResult([], saliency={f"finding{i}": back for i in range(4)})
        t = time.perf_counter()
        write_study_outputs(Path(tmp) / "study", volume, result, "bench", "cpu", report=False,
                            threads=None if mode == "fmct" else 1)
        out["write_4_maps_s"] = time.perf_counter() - t
    out["peak_rss_mb"] = peak_rss_mb()
    if mode == "fmct":  # the map back again, warm and interleaved with ITK's, best of 3 (a single run is noisy)
        best = {"itk": float("inf"), "fmct": float("inf")}
        for _ in range(3):
            for name in best:
                t = time.perf_counter()
                if name == "itk":
                    itk_resample(model_map, mi.model_grid, mi.input_grid, 255)
                else:
                    pre.to_input_grid(model_map, mi, levels=255)
                best[name] = min(best[name], time.perf_counter() - t)
        out["map_back_warm_best_s"] = best
    del volume, mi, back
    if mode == "fmct":  # the other ways the same CT arrives (after the peak: they do not change it)
        for fmt in ("nii.gz", "dicom"):
            if fmt in paths:
                t = time.perf_counter()
                read_volume(paths[fmt])
                out[f"read_{fmt}_s"] = time.perf_counter() - t
    return out


def measure(paths: dict[str, Path], mode: str) -> dict:
    named = {k: str(v) for k, v in paths.items()}
    code = (f"import sys, json; sys.path.insert(0, {str(Path(__file__).parent)!r}); import bench_scaling as b; "
            f"print(json.dumps(b.run_stages({named!r}, {mode!r})))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    if done.returncode != 0:
        return {"error": done.stderr.strip().splitlines()[-1] if done.stderr.strip() else f"exit {done.returncode}"}
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--kinds", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    ap.add_argument("--dir", help="where the CTs are written (kept for re-runs); default a temporary folder")
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args()
    folder = Path(args.dir or tempfile.mkdtemp(prefix="fmct_scaling_"))
    folder.mkdir(parents=True, exist_ok=True)
    results = {"machine": machine(), "cts": {}}
    for kind in args.kinds:
        paths = write_ct(kind, folder)
        input_mb = np.prod(SHAPES[kind]) * 2 / 2**20
        row = {"shape_zyx": SHAPES[kind], "input_int16_mb": round(float(input_mb), 1)}
        for mode in ("itk", "fmct"):
            row[mode] = measure(paths, mode)
        new, old = row["fmct"], row["itk"]
        if "error" not in new:
            # Peak RSS beyond what the imports (numpy, SimpleITK, ...) hold, against the int16 input.
            row["fmct_peak_rss_over_input"] = round((new["peak_rss_mb"] - new["rss_after_imports_mb"]) / input_mb, 2)
            cost = new["map_back_s"] + new["write_map_s"]
            row["fmct_map_back_plus_write_over_read"] = {
                fmt: round(cost / new[key], 2) for fmt, key in (("nii", "read_s"), ("nii.gz", "read_nii.gz_s"),
                                                                ("dicom", "read_dicom_s")) if key in new}
        if "error" not in new:
            warm = new["map_back_warm_best_s"]
            row["map_back_warm_itk_over_fmct"] = round(warm["itk"] / warm["fmct"], 2)
        if "error" not in new and "error" not in old:
            row["ratio_itk_over_fmct"] = {k: round(old[k] / max(new[k], 1e-9), 2)
                                          for k in ("preprocess_s", "map_back_s", "write_map_s", "write_4_maps_s",
                                                    "peak_rss_mb")}
        results["cts"][kind] = row
        print(kind, json.dumps(row))
    emit(results, args.json)


if __name__ == "__main__":
    main()
