"""The Slicer module as a user feels it: GUI freezes, memory, first click on a CPU, before and after.

    python benchmarks/bench_slicer.py [--cases click,memory] [--threads 2] [--json out.json]
    python benchmarks/bench_slicer.py --cases warm,warm,warm --variants after --json benchmarks/results/slicer_warm.json

Runs FMCTLogic on a headless slicer-core scene (Testing/slicer_testing.py: the application's
logics and slice views, no window) in a fresh process per measurement, once with the module as it
was before the analysis moved to a worker process ("before", exported from git: --before-rev) and
once with the current one ("after"):

- click: the panel's first click on a CPU (fresh process: torch import and model load included),
  bundled demo model, its default settings (before: Integrated Gradients for every positive
  finding; after: the top finding only), on a 512 x 512 x 40 synthetic head CT with a subdural
  hematoma. Reports the time to results and the longest stretch the GUI thread could not process
  events: before, the analysis ran on the GUI thread with processEvents() only in its progress
  callback, so the longest gap between progress calls (and from the last one to the end, which
  includes creating the output nodes); after, the longest single GUI-thread call (starting the
  worker, one poll of its output, loading the results), between which the panel's 100 ms timer
  lets Qt process events.
- warm (issue 27 item 6; current module only): on Sample Data's synthetic head CT (the demo
  model finds its subdural hematoma), in one Slicer process, the panel's first click (as click:
  torch import and model load in the worker, the top finding explained), a second click on the same CT with the
  same settings (served by the warm worker), "Explain selected finding" for the next finding
  (warm too), then the worker stopped and the same click once more: a cold click as every click
  was before the worker stayed warm, measured in the same process right after the warm ones.
  Reports each click's time to results, the worker's PID and whether it loaded the model, and the
  warm worker's RSS while it waits (what staying warm costs).
- memory: seven positive findings explained on a 512 x 512 x 165 CT (a random 7-task bundle
  with thresholds of 0.01, attention maps, so it is quick): the peak RSS (VmHWM) of the process
  holding the scene (Slicer), and, after, of the worker process too.

Every number comes from the same machine in the same run; the load average at the start is
recorded (the host may be shared).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tarfile
import tempfile
import time
from io import BytesIO
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
CASES = ("click", "memory")  # and "warm" (after only), on request
SEVEN = ("any_hemorrhage", "epidural", "subdural", "subarachnoid", "intraparenchymal", "fracture", "mass_effect")


def default_before_rev() -> str:
    """The commit before FMCTLib/worker.py was added: the module that analyzed on the GUI thread."""
    added = subprocess.run(["git", "log", "--diff-filter=A", "--format=%H", "--", "FMCT/FMCTLib/worker.py"],
                           cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    return f"{added[-1]}^" if added else "HEAD"


def export_module(rev: str, folder: Path) -> Path:
    """FMCT/ as it was at rev, in folder (the engine stays the current one)."""
    archive = subprocess.run(["git", "archive", "--format=tar", rev, "FMCT"], cwd=ROOT, capture_output=True,
                             check=True).stdout
    with tarfile.open(fileobj=BytesIO(archive)) as tar:
        tar.extractall(folder, filter="data")
    return folder / "FMCT"


def ct_volume(kind: str):
    """512 x 512 x 40 (thick, 5 mm) or x 165 (1 mm) synthetic head CT with a subdural hematoma."""
    import SimpleITK as sitk

    from fmct.phantom import make_phantom
    from fmct.reading.volume import Volume

    ph = make_phantom(7, findings=["subdural"], slices="thick", in_plane_size=512)
    if kind == "thick":
        return ph.volume
    image = ph.volume.to_sitk()
    size = list(image.GetSize())
    spacing = list(image.GetSpacing())
    extent = size[2] * spacing[2]
    new_size, new_spacing = size[:2] + [165], spacing[:2] + [extent / 165]
    resampled = sitk.Resample(image, new_size, sitk.Transform(), sitk.sitkLinear, image.GetOrigin(), new_spacing,
                              image.GetDirection(), -1000.0, image.GetPixelID())
    return Volume.from_sitk(resampled)


def demo_ct():
    """Sample Data's "FMCT synthetic head CT" (the CT `fmct demo` shows), whose subdural hematoma the
    demo model finds: a first click on it explains its top finding, as the panel does on a CPU."""
    from fmct.phantom.demo_sample import DEMO_IN_PLANE_SIZE, DEMO_SEED, demo_sample

    return demo_sample(DEMO_SEED, DEMO_IN_PLANE_SIZE).volume


def rss_mb(pid: int | str = "self") -> float | None:
    """VmRSS of a process in MB: what it holds now."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return round(int(line.split()[1]) / 1024, 1)
    except (OSError, ValueError):
        return None
    return None


def high_water_mb(pid: int | str = "self") -> float | None:
    """VmHWM of a process in MB: its own peak RSS since it started (ru_maxrss is not: Linux carries the
    parent's high-water mark over fork and exec into it)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return round(int(line.split()[1]) / 1024, 1)
    except (OSError, ValueError):
        return None
    return None


def measure(variant: str, case: str, moduleDir: Path, work: Path, threads: int) -> dict:
    """One measurement in this (fresh) process; the module to use is first on sys.path."""
    os.environ["OMP_NUM_THREADS"] = str(threads)
    sys.path.insert(0, str(ROOT / "Testing"))
    from slicer_testing import headless_slicer  # puts the current FMCT/ on sys.path; ours goes first

    sys.path.insert(0, str(moduleDir))
    sys.path.insert(0, str(ROOT))
    from FMCTLib.logic import FMCTLogic

    ctFile = work / f"{case}-ct.nrrd"  # written by the parent, so making it does not count here
    if case == "memory":
        bundle = work / "seven"  # made by the parent: torch is not imported in the scene process for it
        options = {"bundlePath": bundle, "device": "CPU", "explain": "attention", "explainFindings": "positive"}
    else:
        options = {"bundlePath": None, "device": "CPU"}  # the panel's defaults otherwise
    with headless_slicer() as app:
        ct = app.volumesLogic.AddArchetypeScalarVolume(str(ctFile), "CT", 0, None)
        rssBefore = high_water_mb()
        workerPeak = 0.0
        logic = FMCTLogic()
        if variant == "after":  # as the panel does when it opens
            warm = logic.warmUpInBackground()
            if warm is not None:
                warm.join()
        blocks: list[float] = []
        started = time.perf_counter()
        if variant == "before":
            stamps = [started]
            result = logic.analyze(ct, progress=lambda f, m: stamps.append(time.perf_counter()), **options)
            stamps.append(time.perf_counter())
            blocks = [b - a for a, b in zip(stamps, stamps[1:])]
        else:
            t0 = time.perf_counter()
            job = logic.startAnalysis(ct, **options)
            blocks.append(time.perf_counter() - t0)
            kinds = {"start": blocks[-1]}
            while job.running:
                time.sleep(0.1)  # the panel's QTimer interval: Qt processes events in between
                t0 = time.perf_counter()
                job.poll()
                blocks.append(time.perf_counter() - t0)
                if job.pid is not None:
                    workerPeak = max(workerPeak, high_water_mb(job.pid) or 0.0)
                kinds["poll"] = max(kinds.get("poll", 0.0), blocks[-1])
            mark = [time.perf_counter()]

            def between():  # the panel processes events (user input excluded) after each map
                now = time.perf_counter()
                blocks.append(now - mark[0])
                kinds["load"] = max(kinds.get("load", 0.0), blocks[-1])
                mark[0] = now

            result = logic.finishAnalysis(job, between=between)
            blocks.append(time.perf_counter() - mark[0])
            kinds["load_end"] = blocks[-1]
        total = time.perf_counter() - started
        out = {
            "variant": variant, "case": case, "seconds_to_results": round(total, 2),
            "longest_gui_block_s": round(max(blocks), 3), "gui_blocks": len(blocks),
            "maps": sorted(result.saliencyNodes), "positive": result.positive, "shown": result.shownFinding,
            "saliency_dtype": str(__import__("slicer.util").util.arrayFromVolume(
                next(iter(result.saliencyNodes.values()))).dtype) if result.saliencyNodes else None,
            "peak_rss_mb_scene_process": high_water_mb(),
            "peak_rss_mb_before_analysis": rssBefore,
            "peak_rss_increase_mb": round(high_water_mb() - rssBefore, 1),
        }
        if variant == "after":
            out["longest_block_by_kind_s"] = {k: round(v, 3) for k, v in kinds.items()}
            out["peak_rss_mb_worker"] = workerPeak  # sampled at each poll (VmHWM) while it ran
        return out


def click(logic, ct, start, options: dict) -> dict:
    """One click to results as the panel polls it (start: logic.startAnalysis or logic.explainFinding)."""
    started = time.perf_counter()
    job = start(ct, **options)
    while job.running:
        time.sleep(0.1)  # the panel's QTimer interval
        job.poll()
    result = logic.finishAnalysis(job)
    return {"seconds_to_results": round(time.perf_counter() - started, 2), "worker_pid": result.worker.get("pid"),
            "model_loaded": result.worker.get("model_loaded"), "model_loads": result.worker.get("model_loads"),
            "worker_load_s": round(result.timings.get("load_s", 0.0), 2), "maps": sorted(result.saliencyNodes),
            "shown": result.shownFinding, "explained": result.explained}


def measure_warm(moduleDir: Path, work: Path, threads: int) -> dict:
    """First click, second click, Explain selected finding, then a cold click: one Slicer process."""
    os.environ["OMP_NUM_THREADS"] = str(threads)
    sys.path.insert(0, str(ROOT / "Testing"))
    from slicer_testing import headless_slicer

    sys.path.insert(0, str(moduleDir))
    sys.path.insert(0, str(ROOT))
    from FMCTLib.logic import FMCTLogic

    options = {"bundlePath": None, "device": "CPU"}  # the panel's defaults
    with headless_slicer() as app:
        ct = app.volumesLogic.AddArchetypeScalarVolume(str(work / "warm-ct.nrrd"), "CT", 0, None)
        logic = FMCTLogic()
        warm = logic.warmUpInBackground()
        if warm is not None:
            warm.join()
        rows = {"first_click": click(logic, ct, logic.startAnalysis, options),
                "second_click": click(logic, ct, logic.startAnalysis, options)}
        shown = rows["second_click"]["shown"]
        table = logic.findingsTableNode(ct)
        from FMCTLib import outputs

        names = [outputs.findingAtRow(table, r) for r in range(table.GetNumberOfRows())]
        other = next(n for n in names if n and n != shown)
        rows["explain_selected"] = click(logic, ct, lambda node, **o: logic.explainFinding(node, other, **o), options)
        rows["explain_selected"]["finding"] = other
        time.sleep(1.0)
        idle = rss_mb(logic.worker.pid)  # what staying warm costs while the worker waits for the next click
        logic.stopWorker()  # every click was cold before the worker stayed warm
        rows["cold_click_after_stop"] = click(logic, ct, logic.startAnalysis, options)
        logic.stopWorker()
    first, second, cold = (rows[k]["seconds_to_results"] for k in ("first_click", "second_click",
                                                                   "cold_click_after_stop"))
    return {"variant": "after", "case": "warm", **rows, "worker_idle_rss_mb": idle,
            "second_over_first": round(second / first, 3), "second_over_cold_after_stop": round(second / cold, 3)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", default=",".join(CASES))
    parser.add_argument("--variants", default="before,after")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--before-rev", default=None, help="git revision of the 'before' module (default: "
                                                            "the commit before FMCTLib/worker.py was added)")
    parser.add_argument("--json", default=None)
    parser.add_argument("--one", nargs=3, metavar=("VARIANT", "CASE", "MODULE_DIR"), help=argparse.SUPPRESS)
    parser.add_argument("--work", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.one:
        variant, case, moduleDir = args.one
        if case == "warm":
            print(json.dumps(measure_warm(Path(moduleDir), Path(args.work), args.threads)))
        else:
            print(json.dumps(measure(variant, case, Path(moduleDir), Path(args.work), args.threads)))
        return 0

    rev = args.before_rev or default_before_rev()
    rows = []
    with tempfile.TemporaryDirectory(prefix="fmct-bench-slicer-") as tmp:
        work = Path(tmp)
        variants = args.variants.split(",")
        modules = {"before": export_module(rev, work / "before") if "before" in variants else None,
                   "after": ROOT / "FMCT"}
        from fmct.reading.files import write_volume

        if "memory" in args.cases.split(","):
            from fmct.phantom.fixtures import tiny_bundle

            tiny_bundle(work / "seven", tasks=[(n, 0.01) for n in SEVEN], temperature=1.0)
        for case in args.cases.split(","):  # int16 HU, as CTs are stored
            volume = demo_ct() if case == "warm" else ct_volume("thin" if case == "memory" else "thick")
            write_volume(volume.with_array(volume.array.round().astype("int16")), work / f"{case}-ct.nrrd")
        for case in args.cases.split(","):
            for variant in (["after"] if case == "warm" else variants):
                run = subprocess.run([sys.executable, __file__, "--threads", str(args.threads), "--work", str(work),
                                      "--one", variant, case, str(modules[variant])],
                                     capture_output=True, text=True, timeout=3600)
                if run.returncode != 0:
                    print(run.stdout[-3000:], run.stderr[-5000:], file=sys.stderr)
                    raise SystemExit(f"{variant}/{case} failed")
                row = json.loads(run.stdout.strip().splitlines()[-1])
                rows.append(row)
                print(json.dumps(row), flush=True)
    report = {"machine": {"cpu_count": os.cpu_count(), "threads": args.threads,
                          "load_avg_1min_at_start": round(os.getloadavg()[0], 2), "python": sys.version.split()[0]},
              "commit": subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip(),
              "rows": rows}
    if "before" in variants:
        report["before_rev"] = subprocess.run(["git", "rev-parse", rev], cwd=ROOT, capture_output=True,
                                              text=True).stdout.strip()
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
