"""FMCTLogic: a CT volume node in, a findings table and saliency overlays in the scene out.

Every decision of the FMCT module is made here, so scripts, tests and the widget behave alike:
which bundle and device, what counts as a valid input, which findings are explained, which
nodes are created or reused, which finding is shown first, how overlays look. The widget only
forwards clicks and shows progress.

The numerical work runs in a separate process (FMCTLib/worker.py, on Slicer's own Python), not
on Slicer's GUI thread: importing torch, loading a model and Integrated Gradients take seconds
to minutes, during which Slicer would stop repainting ("Not responding" on Windows after 5 s)
and a processEvents() mid-run would let the user close the scene under the running analysis.
The logic exports the CT node to a temporary NRRD (LPS, the node's own voxel type), sends it to
the worker, reads its JSON-lines progress while the GUI polls (AnalysisJob.poll, from a QTimer),
and loads the result folder into nodes in one short step at the end. The worker stays warm
between clicks (FMCTLib/warmworker.py: torch imported and the model loaded once, "Explain
selected finding" served by the same process); it is started on first use and again when it
died. Cancel kills the worker's process tree (the next click starts a fresh one), as does
stopWorker() (module cleanup); nothing is added to the scene before the worker has finished.

Importing this module imports neither torch nor fmct (Slicer must start, and the module must
load, before they are installed).

Scripting (Slicer's Python console, or any Python with slicer-core)::

    from FMCTLib.logic import FMCTLogic
    result = FMCTLogic().analyze(ctNode)                      # bundled demo model, device auto; blocks
    result.findings        # [{"name", "description", "probability", "threshold", "positive"}, ...]
    result.tableNode       # vtkMRMLTableNode
    result.saliencyNodes   # {"subdural": vtkMRMLScalarVolumeNode (uint8, 0-255), ...}
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import threading
import time
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from FMCTLib import geometry, outputs, worker
from FMCTLib.dependencies import DependencyLogic, engineSourceDir, useEngineSource
from FMCTLib.process import ChildProcess, pythonExecutable
from FMCTLib.warmworker import WarmWorker

try:
    from slicer.ScriptedLoadableModule import ScriptedLoadableModuleLogic
except ImportError:  # slicer-core from PyPI has MRML and the module logics, not the application's Python base classes
    ScriptedLoadableModuleLogic = object

log = logging.getLogger("FMCT")

DEVICES = ("auto", "CPU", "GPU")
# The engine's methods (fmct.conventions.runtime.EXPLAIN_METHODS) and "none"; spelled out here because the
# panel needs them before the engine is installed. A test checks they match the engine.
EXPLAIN_METHODS = ("integrated_gradients", "occlusion", "attention", "attention_rollout", "none")
DEFAULT_EXPLAIN = "integrated_gradients"
DEFAULT_EXPLAIN_FINDINGS = worker.AUTO
SAMPLE_NAME = "FMCT synthetic head CT"  # in Sample Data, category FMCT
SAMPLE_SEED = None  # None: the engine's DEMO_SEED (fmct.phantom.demo_sample), the CT `fmct demo` shows, chosen by one rule

# Share of the progress bar for each stage: the worker's work dominates.
_EXPORT_END, _WORKER_END = 0.03, 0.97
# A CPU-only first click: what the panel says, so a laptop user knows why it takes a while.
CPU_NOTICE = ("No GPU is used: the analysis runs on the CPU, where each saliency map takes about 30 s or more. "
              "Only the top finding is explained; select another finding in the table and click "
              "'Explain selected finding' for its map.")


@dataclass
class FMCTResult:
    """What one analysis left in the scene, and the numbers behind it."""

    findings: list[dict]
    tableNode: object
    saliencyNodes: dict = field(default_factory=dict)
    shownFinding: str | None = None
    modelName: str = ""
    device: str = ""
    timings: dict = field(default_factory=dict)
    gpu: bool = False
    explained: list[str] = field(default_factory=list)
    outOfDistribution: dict | None = None  # the engine's record (score, threshold, in_distribution); None: not judged
    warning: str | None = None  # the engine's warning when the CT is unlike the model's training data
    checks: list = field(default_factory=list)  # the engine's plausibility checks of the CT (fmct.checks), as dicts
    banner: str | None = None  # the bundle's one line shown with every result ("trained on synthetic heads only")
    worker: dict = field(default_factory=dict)  # the process that served it: pid, model_loads, requests, model_loaded

    def checkLines(self) -> list[str]:
        """One line per check for the panel: name, ok/FLAGGED and the measured value's message."""
        return [f"{c['name']}: {'ok' if c['passed'] else 'FLAGGED'} ({c.get('message', '')})" for c in self.checks]

    @property
    def positive(self) -> list[str]:
        return [f["name"] for f in self.findings if f["positive"]]



def defaultBundlePath() -> Path:
    """The bundled demo model: $FMCT_BUNDLE, else Resources/DemoModel of the engine source that
    came with this module (extension or checkout), else the engine's own default.

    The module resolves it rather than the engine because a pip-installed engine lives in
    site-packages, far from the Resources folder it was built from.
    """
    if os.environ.get("FMCT_BUNDLE"):
        return Path(os.environ["FMCT_BUNDLE"])
    source = engineSourceDir()
    if source is not None and (source / "Resources" / "DemoModel").exists():
        return source / "Resources" / "DemoModel"
    from fmct.inference.bundle import default_bundle_path

    return default_bundle_path()


def engineDevice(device: str | None) -> str:
    """Map the module's device choice (auto, CPU, GPU; any case; or the engine's own names) to the
    engine's, checked by the engine's one device parser (fmct.conventions.runtime.parse_device)."""
    from fmct.conventions.runtime import parse_device

    choice = (device or "auto").strip().lower()
    return parse_device({"gpu": "cuda"}.get(choice, choice))


def engineExplainMethod(explain: str | None) -> str | None:
    """The engine's method name, or None for no explanation ('none' or None); the engine checks it."""
    from fmct.conventions.runtime import explain_method_or_none

    return explain_method_or_none(explain)


def engineExplainFindings(explainFindings: str | Sequence[str]) -> str:
    """The worker's --findings value: auto, top, positive, all, or names joined by commas."""
    if isinstance(explainFindings, str):
        if explainFindings in worker.EXPLAIN_CHOICES:
            return explainFindings
        return explainFindings.strip()
    names = [str(n).strip() for n in explainFindings]
    if not names or any(not n or "," in n for n in names):
        from fmct.conventions.errors import ConfigError

        raise ConfigError(f"explainFindings must name findings (got {list(explainFindings)!r})")
    return ",".join(names)


def bundlePathFromChoice(useDemoModel: bool, bundlePath: str | Path | None) -> Path | None:
    """The bundle the widget's choice means: None (the bundled demo model) or a chosen path."""
    if useDemoModel:
        return None
    text = str(bundlePath or "").strip()
    if text in ("", "."):  # an empty ctkPathLineEdit reads as Path("."), not as a bundle
        from fmct.conventions.errors import ConfigError

        raise ConfigError("Choose a model bundle (a folder with fmct.json, or a .zip of one), "
                          "or tick 'Bundled demo model'.")
    return Path(text)


def canAnalyze(inputVolumeNode, useDemoModel: bool, bundlePath: str | Path | None, running: bool) -> tuple[bool, str]:
    """Whether the Analyze button is enabled, and its tooltip saying why (not)."""
    if running:
        return False, "An analysis is running."
    if inputVolumeNode is None:
        return False, "Select a head CT volume."
    if not useDemoModel and str(bundlePath or "").strip() in ("", "."):
        return False, "Choose a model bundle, or tick 'Bundled demo model'."
    return True, "Find hemorrhage, fracture, mass effect and midline shift, and show where the model looked."


def canExplain(tableNode, row: int, running: bool) -> tuple[bool, str]:
    """Whether 'Explain selected finding' is enabled: a finding without a map is selected."""
    if running:
        return False, "An analysis is running."
    finding = outputs.findingAtRow(tableNode, row)
    inputNode = outputs.inputNodeOf(tableNode)
    if finding is None or inputNode is None:
        return False, "Select a finding in the table."
    if finding in outputs.saliencyNodes(inputNode):
        return False, f"{finding} already has a saliency map."
    return True, f"Compute the saliency map of {finding}."


def volumesLogic(scene):
    """The Volumes module logic that loads files into this scene: the application's, else our own."""
    import slicer

    try:
        logic = slicer.modules.volumes.logic()
        if logic.GetMRMLScene() is scene:
            return logic
    except AttributeError:
        pass
    logic = slicer.vtkSlicerVolumesLogic()
    logic.SetMRMLScene(scene)
    return logic


def deviceNotice(gpu: bool | None, explain: str | None,
                 explainFindings: str | Sequence[str] = DEFAULT_EXPLAIN_FINDINGS) -> str:
    """What the panel says about the device once the worker has chosen it: nothing on a GPU (or
    before it is known); on a CPU, that no GPU is used and what that costs."""
    if gpu is not False:
        return ""
    if engineExplainMethod(explain) is None or explainFindings != worker.AUTO:
        return "No GPU is used: the analysis runs on the CPU."
    return CPU_NOTICE


class AnalysisJob:
    """One analysis running in the worker process: poll() it from the GUI, cancel() it, then
    FMCTLogic.finishAnalysis(job) loads it into the scene.

    It starts in a thread of its own: checking the CT's values, writing it to a file and starting
    the process take a few tenths of a second for a large CT, which the GUI thread does not wait
    for. State: "running", then "done", "failed" (error holds the worker's error event, or
    exception what refused the CT before any process started) or "cancelled". fraction and
    message are the overall progress (export, worker, loading).
    """

    def __init__(self, inputNode, workDir: Path, keepOtherMaps: bool) -> None:
        self.inputNode = inputNode
        self.workDir = workDir
        self.child: ChildProcess | None = None
        self.keepOtherMaps = keepOtherMaps
        self.state = "running"
        self.fraction, self.message = 0.0, "preparing the CT"
        self.device: str | None = None
        self.gpu: bool | None = None
        self.modelName = ""
        self.done: dict | None = None
        self.error: dict | None = None
        self.exception: BaseException | None = None
        self.started = time.perf_counter()
        self.explain: str | None = None  # the choices it runs with (the panel's device notice)
        self.explainFindings: str = DEFAULT_EXPLAIN_FINDINGS
        self._lock = threading.Lock()
        self._launcher: threading.Thread | None = None

    def launch(self, prepare) -> None:
        """Run prepare() -> ChildProcess in a thread; the job follows the process it returns."""
        self._launcher = threading.Thread(target=self._launch, args=(prepare,), name="fmct-analysis-start", daemon=True)
        self._launcher.start()

    def _launch(self, prepare) -> None:
        try:
            child = prepare()
        except BaseException as error:  # refused (not a CT, ...) or could not start: raised by finishAnalysis
            self.exception = error
            self.cleanup()
            return
        with self._lock:
            if self.state == "cancelled":
                child.stop()
                self.cleanup()
                return
            self.child = child
            self.fraction, self.message = _EXPORT_END, "starting the analysis process"

    @staticmethod
    def overall(workerFraction: float) -> float:
        """The worker's progress on the whole bar (export before it, loading the results after)."""
        return _EXPORT_END + (_WORKER_END - _EXPORT_END) * min(max(float(workerFraction), 0.0), 1.0)

    @property
    def pid(self) -> int | None:
        return self.child.pid if self.child is not None else None

    @property
    def running(self) -> bool:
        return self.state == "running"

    def wait(self, timeout: float = 30.0) -> None:
        """Wait until the worker has been started (or refused); for scripts and tests."""
        if self._launcher is not None:
            self._launcher.join(timeout)

    def poll(self) -> list[dict]:
        """Read what the worker printed since the last call (never blocks); returns its events.

        The state becomes done or failed with the worker's "done" or "error" line (the warm worker
        then waits for the next request), or failed when the worker exited without either.
        """
        from fmct.conventions.runtime import PROGRESS_EVENT, read_json_line

        if self.state != "running":
            return []
        if self.child is None:
            if self._launcher is not None and not self._launcher.is_alive() and self.exception is not None:
                self.state = "failed"
            return []
        events = []
        for line in self.child.lines():
            event = read_json_line(line)
            if event is None:
                log.debug("FMCT worker: %s", line.rstrip())
                continue
            events.append(event)
            kind = event.get("event")
            if kind == PROGRESS_EVENT:
                self.fraction = self.overall(event.get("fraction", 0.0))
                self.message = str(event.get("message", ""))
            elif kind == "device":
                self.device, self.gpu, self.modelName = event.get("device"), bool(event.get("gpu")), event.get("model", "")
            elif kind == "done":
                self.done = event
            elif kind == "error":
                self.error = event
            if kind in ("done", "error"):
                break  # the end of this request; the warm worker's next lines belong to the next one
        if self.done is not None or self.error is not None:
            self.state = "done" if self.finished() else "failed"
        elif not self.child.running() and self.child.outputClosed:
            self.state = "failed"
            self.child.close()
        return events

    def finished(self) -> bool:
        """Whether the worker delivered its results: a done event and the folder's findings.json (written last,
        once every file read back whole). A worker that crashed after that (a one-off worker at interpreter
        exit) still delivered them; finishAnalysis checks each file before it loads one."""
        if self.done is None:
            return False
        code = self.child.returncode() if self.child is not None else None
        if code == 0:
            return True
        if (Path(str(self.done.get("folder", ""))) / "findings.json").is_file():
            if code is not None:
                log.warning("FMCT worker exited with code %s after writing its results; they are kept", code)
            return True
        return False

    def cancel(self) -> None:
        """Kill the worker and everything it started, and delete its files; the scene is untouched."""
        with self._lock:
            if self.state == "cancelled":
                return
            wasRunning = self.state == "running"
            self.state = "cancelled"
            child = self.child
        if child is not None and wasRunning:
            child.stop()
        if self._launcher is None or not self._launcher.is_alive():
            self.cleanup()  # else the starting thread cleans up once it sees the cancel

    def cleanup(self) -> None:
        """Delete the job's files; a one-off worker (stdin closed after its one request) that has not
        ended by now is stopped and reaped, the warm one is left waiting for the next click."""
        child = self.child
        if child is not None and self.state != "running" and child.inputClosed and child.running():
            child.stop()
        shutil.rmtree(self.workDir, ignore_errors=True)

    def raiseError(self) -> None:
        """Raise what made the worker fail: the engine's own exception type for a user mistake."""
        import fmct.conventions.errors

        if self.exception is not None:
            raise self.exception
        if self.error is not None:
            kind = getattr(fmct.conventions.errors, str(self.error.get("type")), None)
            message = str(self.error.get("message", ""))
            if isinstance(kind, type) and issubclass(kind, fmct.conventions.errors.FMCTError):
                raise kind(message)
            detail = self.error.get("traceback") or self.child.stderrTail()
            raise RuntimeError(f"FMCT analysis failed: {message}\n{detail}")
        raise RuntimeError(f"The FMCT analysis process ended with exit code {self.child.returncode()} "
                           f"before finishing:\n{self.child.stderrTail()}")


class FMCTLogic(ScriptedLoadableModuleLogic):
    """Runs FMCT on volume nodes and manages the output nodes. Usable without the widget."""

    def __init__(self, dependencies: DependencyLogic | None = None, python: str | None = None) -> None:
        super().__init__()
        self.dependencies = dependencies or DependencyLogic()
        self.python = python or pythonExecutable()
        self._volumeRenderingLogics: dict[int, object] = {}
        self._jobs: list[AnalysisJob] = []
        self._cancelRequested = False
        self.worker = WarmWorker()
        weakref.finalize(self, self.worker.stop)  # a logic that goes away takes its worker with it

    # -- the one-click analysis ------------------------------------------------------------------

    def analyze(self, inputVolumeNode, bundlePath: str | Path | None = None, device: str = "auto",
                explain: str | None = DEFAULT_EXPLAIN, progress=None, cancel=None,
                explainFindings: str | Sequence[str] = DEFAULT_EXPLAIN_FINDINGS,
                pollSeconds: float = 0.05) -> FMCTResult:
        """Analyze one CT node and wait for it; fill (or update) its findings table and saliency volumes.

        The blocking form of startAnalysis/finishAnalysis for scripts: the same worker process.
        bundlePath: a model bundle folder or .zip; None for the bundled demo model.
        device: auto (GPU when present), CPU or GPU.
        explain: one of EXPLAIN_METHODS; explainFindings: "auto" (every positive finding on a GPU,
        the top one on a CPU), "top", "positive", "all", or a list of names.
        progress(fraction, message) is called as the work advances; cancel() -> True stops it
        (as does requestCancel()): the worker is killed, fmct.conventions.errors.Cancelled raised, and the
        scene keeps its earlier outputs.
        """
        from fmct.conventions.errors import Cancelled

        report = progress or (lambda fraction, message: None)
        self._cancelRequested = False
        report(0.0, "reading the input volume")
        job = self.startAnalysis(inputVolumeNode, bundlePath, device, explain, explainFindings)
        try:
            while job.running:
                for event in job.poll():  # every progress line, not only the latest
                    if event.get("event") == "progress":
                        report(job.overall(event.get("fraction", 0.0)), str(event.get("message", "")))
                report(job.fraction, job.message)
                if self._cancelRequested or (cancel is not None and cancel()):
                    job.cancel()
                    raise Cancelled("Analysis cancelled")
                if job.running:
                    time.sleep(pollSeconds)
            result = self.finishAnalysis(job)
        finally:
            if job.running:
                job.cancel()
        report(1.0, "done")
        return result

    def startAnalysis(self, inputVolumeNode, bundlePath: str | Path | None = None, device: str = "auto",
                      explain: str | None = DEFAULT_EXPLAIN,
                      explainFindings: str | Sequence[str] = DEFAULT_EXPLAIN_FINDINGS,
                      keepOtherMaps: bool = False) -> AnalysisJob:
        """Check the choices, copy the CT and start the worker (from a thread); returns at once.

        Refused here, raising: no or a wrong node (a label map, a colour image), an unknown device
        or method, a missing bundle. Refused by the starting thread, before any process starts,
        and raised by finishAnalysis: values that are not a head CT in HU, a single slice.
        """
        self.dependencies.requireEngine()
        useEngineSource(self.dependencies.engineSource)
        from fmct.conventions.errors import BundleError

        geometry.checkInputNode(inputVolumeNode)
        engineName = engineDevice(device)
        method = engineExplainMethod(explain)
        findings = engineExplainFindings(explainFindings)
        bundle = Path(bundlePath) if bundlePath else defaultBundlePath()
        if not bundle.exists():
            raise BundleError(f"Model bundle {bundle} not found: choose a bundle folder (with fmct.json) or a .zip of one.")
        view = geometry.volumeFromNode(inputVolumeNode, copy=False)
        volume = view.with_array(view.array.copy())  # the node may change (or go) while the copy is written
        del view
        workDir = Path(tempfile.mkdtemp(prefix="fmct-analysis-"))
        command = [self.python, str(Path(worker.__file__).resolve()), "--serve"]
        if self.dependencies.engineSource is not None:
            command += ["--engine-source", str(self.dependencies.engineSource)]
        request = {"input": str(workDir / "ct.nrrd"), "out": str(workDir / "result"), "bundle": str(bundle.resolve()),
                   "device": engineName, "explain": method or "none", "findings": findings}
        environment = self.workerEnvironment()

        def prepare() -> ChildProcess:
            """Off the GUI thread: refuse what is not a head CT, write it (uncompressed, its own voxel
            type), send it to the warm worker (started now if there is none or it died)."""
            from fmct.reading.files import write_volume
            from fmct.reading.volume import validate_ct

            validate_ct(volume, "The input volume")
            write_volume(volume, workDir / "ct.nrrd")
            volume.array = None  # the file has it now
            child = self.worker.serve(job, command, environment, request)
            log.info("FMCT: analysis sent to process %d (%s, %s)", child.pid, engineName, method or "no explanation")
            return child

        job = AnalysisJob(inputVolumeNode, workDir, keepOtherMaps)
        job.explain, job.explainFindings = method, findings
        self._jobs = [j for j in self._jobs if j.running] + [job]
        job.launch(prepare)
        return job

    def warmUpInBackground(self) -> threading.Thread | None:
        """Import the engine modules the logic uses (SimpleITK among them: 0.3 s) in a thread, when the
        panel opens, so the first Analyze click does not pay for it on the GUI thread."""
        if self.dependencies.missingPackages():
            return None

        def warmUp() -> None:
            useEngineSource(self.dependencies.engineSource)
            import fmct.conventions.errors  # noqa: F401
            import fmct.reading.files  # noqa: F401
            import fmct.conventions.runtime  # noqa: F401

        thread = threading.Thread(target=warmUp, name="fmct-warm-up", daemon=True)
        thread.start()
        return thread

    def workerEnvironment(self) -> dict[str, str]:
        """Unbuffered UTF-8 output, so progress arrives as it happens."""
        return {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONIOENCODING": "utf-8"}

    def finishAnalysis(self, job: AnalysisJob, between=None) -> FMCTResult:
        """Load a finished job's results into the scene in one step (or raise what made it fail).

        Nothing was added to the scene before this call, so a failed or cancelled analysis leaves
        the previous outputs of this CT as they were; every result file is checked before any
        node is touched. between(), if given, is called after each saliency map: the panel lets
        Qt repaint there (user input excluded, so the scene cannot be closed under the load).
        """
        from fmct.conventions.errors import Cancelled, InputVolumeError

        try:
            if job.state == "cancelled":
                raise Cancelled("Analysis cancelled")
            if job.state == "running":
                raise RuntimeError("finishAnalysis() was called while the analysis is still running")
            if job.state == "failed":
                job.raiseError()
            node = job.inputNode
            if node.GetScene() is None:
                raise InputVolumeError("The CT was removed from the scene while it was being analyzed.")
            done = job.done
            folder = Path(done["folder"])
            maps = outputs.SaliencyFiles(folder, done["saliency_files"], node).check()
            shown = done.get("primary")
            if job.keepOtherMaps:
                shown = next(iter(maps), shown)
            tableNode = outputs.updateFindingsTable(node, done["findings"])
            saliencyNodes = outputs.updateSaliencyNodes(node, maps, replace=not job.keepOtherMaps, between=between)
            for name, mapNode in saliencyNodes.items():
                mapNode.SetAttribute(outputs.SCALE_ATTRIBUTE, done.get("saliency_scale") or "")
            tableNode.SetAttribute(outputs.MAPS_NOTE_ATTRIBUTE,
                                   outputs.mapsNote(outputs.saliencyNodes(node), done.get("saliency_scale")))
            self.showFinding(node, shown)
            timings = {**done.get("timings", {}), "wall_s": time.perf_counter() - job.started}
            result = FMCTResult(done["findings"], tableNode, saliencyNodes, self.shownFinding(node),
                                done.get("model", job.modelName), done.get("device", job.device or ""), timings,
                                bool(done.get("gpu")), list(done.get("explained", [])),
                                done.get("out_of_distribution"), done.get("warning"), list(done.get("checks") or []),
                                done.get("banner"), dict(done.get("worker") or {}))
            tableNode.SetAttribute(outputs.WARNING_ATTRIBUTE, result.warning or "")
            tableNode.SetAttribute(outputs.CHECKS_ATTRIBUTE, json.dumps(result.checks))
            tableNode.SetAttribute(outputs.BANNER_ATTRIBUTE, result.banner or "")
        finally:
            job.cleanup()
        log.info("FMCT: analyzed on %s in %.1f s; positive: %s", result.device, timings["wall_s"],
                 ", ".join(result.positive) or "none")
        return result

    def explainFinding(self, inputVolumeNode, finding: str, bundlePath: str | Path | None = None,
                       device: str = "auto", explain: str | None = DEFAULT_EXPLAIN) -> AnalysisJob:
        """Start computing one more finding's map for a CT that was analyzed (the panel's on-demand
        explanation); finishAnalysis adds it next to the maps already there and shows it."""
        return self.startAnalysis(inputVolumeNode, bundlePath, device, explain, [finding], keepOtherMaps=True)

    def stopWorker(self) -> None:
        """Kill the warm worker and everything it started (module cleanup); a later analysis starts a new one."""
        self.worker.stop()

    def requestCancel(self) -> None:
        """Stop the running analyses now (the widget's Cancel button): their processes are killed."""
        self._cancelRequested = True
        for job in self._jobs:
            if job.running:
                job.cancel()
        self._jobs = []

    # -- showing results --------------------------------------------------------------------------

    def showFinding(self, inputVolumeNode, finding: str | None) -> bool:
        """Overlay a finding's saliency on its CT in the slice views and volume-render it in 3D.

        A finding without a map (negative, or not explained) clears the overlay rather than
        leaving another finding's map on screen, except the attention map, which is finding-agnostic:
        it is shown whichever finding is selected. Returns whether a map is shown.
        """
        nodes = outputs.saliencyNodes(inputVolumeNode)
        shown = finding if finding in nodes else (outputs.ATTENTION if outputs.ATTENTION in nodes else None)
        outputs.showInSliceViews(inputVolumeNode.GetScene(), inputVolumeNode, nodes.get(shown))
        outputs.showIn3D(self.volumeRenderingLogic(inputVolumeNode.GetScene()), nodes, shown)
        inputVolumeNode.SetAttribute(outputs.SHOWN_ATTRIBUTE, shown or "")
        return shown is not None

    def showFindingAtRow(self, tableNode, row: int) -> str | None:
        """Show the finding of a row of a findings table (the widget's table selection)."""
        finding = outputs.findingAtRow(tableNode, row)
        inputNode = outputs.inputNodeOf(tableNode)
        if finding is None or inputNode is None:
            return None
        self.showFinding(inputNode, finding)
        return finding

    def shownFinding(self, inputVolumeNode) -> str | None:
        return inputVolumeNode.GetAttribute(outputs.SHOWN_ATTRIBUTE) or None

    def findingsTableNode(self, inputVolumeNode):
        return outputs.findingsTableNode(inputVolumeNode)

    def saliencyNodes(self, inputVolumeNode) -> dict:
        return outputs.saliencyNodes(inputVolumeNode)

    def saliencyToSegmentation(self, inputVolumeNode, finding: str, fraction: float = outputs.DISPLAY_THRESHOLD):
        """A segmentation of where a finding's saliency is at least `fraction` of its peak (for export,
        measurement or editing in Segment Editor); updated in place on a second call."""
        nodes = outputs.saliencyNodes(inputVolumeNode)
        if finding not in nodes:
            raise KeyError(f"{finding} has no saliency map; explain it first")
        return outputs.thresholdToSegmentation(nodes[finding], fraction)

    # -- sample data ---------------------------------------------------------------------------------

    def loadSyntheticHeadCT(self, scene, folder: str | Path | None = None, seed: int | None = SAMPLE_SEED,
                            inPlaneSize: int | None = None):
        """The demo's synthetic head CT with a subdural hematoma (fmct.phantom.demo_sample), as a volume node.

        Sample Data's "FMCT synthetic head CT": a new user can try the module with one click and
        no patient data. By default the very CT `fmct demo` shows (seed and size from the engine,
        chosen by benchmarks/pick_demo_seed.py's rule; Testing/test_sample_data.py checks the shipped
        model's answer on it). Written as NRRD and read with Slicer's own reader, as a downloaded
        sample would be; the file stays in `folder` (Slicer's cache folder in the application).
        """
        self.dependencies.requireSampleEngine()  # numpy and SimpleITK: no PyTorch needed to look at a CT
        from fmct.reading.files import write_volume
        from fmct.phantom.demo_sample import DEMO_IN_PLANE_SIZE, DEMO_SEED, demo_sample

        folder = Path(folder) if folder is not None else Path(tempfile.mkdtemp(prefix="fmct-sample-"))
        folder.mkdir(parents=True, exist_ok=True)
        seed = DEMO_SEED if seed is None else seed
        phantom = demo_sample(seed, DEMO_IN_PLANE_SIZE if inPlaneSize is None else inPlaneSize)
        path = write_volume(phantom.volume, folder / f"FMCT-synthetic-head-CT-{seed}.nrrd")
        node = volumesLogic(scene).AddArchetypeScalarVolume(str(path), SAMPLE_NAME, 0, None)
        if node is None:
            raise RuntimeError(f"Slicer could not read {path}")
        return node

    def volumeRenderingLogic(self, scene):
        """The application's volume rendering logic when it serves this scene, else our own.

        In Slicer the Volume Rendering module's logic observes the scene and the 3D views; in a
        script or test on a bare scene, a logic of our own makes the same MRML nodes.
        """
        try:
            import slicer

            appLogic = slicer.modules.volumerendering.logic()
            if appLogic.GetMRMLScene() is scene:
                return appLogic
        except AttributeError:
            pass
        key = id(scene)
        if key not in self._volumeRenderingLogics:
            import slicer

            vrLogic = slicer.vtkSlicerVolumeRenderingLogic()
            vrLogic.SetMRMLScene(scene)
            self._volumeRenderingLogics[key] = (scene, vrLogic)  # keep the scene alive with its logic
        return self._volumeRenderingLogics[key][1]

