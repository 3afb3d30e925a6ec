"""FMCTLogic: a CT volume node in, a findings table and saliency overlays in the scene out.

Every decision of the FMCT module is made here, so scripts, tests and the widget behave alike:
which bundle and device, what counts as a valid input, which nodes are created or reused,
which finding is shown first, how overlays look. The widget only forwards clicks and shows
progress. The numerical work is the engine's (fmct.analyze.Analyzer); this class moves data
between MRML nodes and the engine.

Importing this module imports neither torch nor fmct (Slicer must start, and the module must
load, before they are installed); they are imported when an analysis runs.

Scripting (Slicer's Python console, or any Python with slicer-core)::

    from FMCTLib.logic import FMCTLogic
    result = FMCTLogic().analyze(ctNode)                      # bundled demo model, device auto
    result.findings        # [{"name", "description", "probability", "threshold", "positive"}, ...]
    result.tableNode       # vtkMRMLTableNode
    result.saliencyNodes   # {"subdural": vtkMRMLScalarVolumeNode, ...}
"""
from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

from FMCTLib import geometry, outputs
from FMCTLib.dependencies import DependencyLogic, engineSourceDir

try:
    from slicer.ScriptedLoadableModule import ScriptedLoadableModuleLogic
except ImportError:  # slicer-core from PyPI has MRML and the module logics, not the application's Python base classes
    ScriptedLoadableModuleLogic = object

log = logging.getLogger("FMCT")

Progress = Callable[[float, str], None]
CancelCheck = Callable[[], bool]

DEVICES = ("auto", "CPU", "GPU")
EXPLAIN_METHODS = ("integrated_gradients", "occlusion", "attention", "attention_rollout", "none")
DEFAULT_EXPLAIN = "integrated_gradients"

# Share of the progress bar for each stage: the model's forward and explanations dominate.
_LOAD_END, _ENGINE_END = 0.05, 0.95


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
    from fmct.bundle import default_bundle_path

    return default_bundle_path()


def engineDevice(device: str | None) -> str:
    """Map the module's device choice (auto, CPU, GPU; any case; or the engine's own names) to the engine's."""
    choice = (device or "auto").strip().lower()
    names = {"auto": "auto", "cpu": "cpu", "gpu": "cuda", "cuda": "cuda"}
    if choice not in names and not choice.startswith("cuda:"):
        from fmct.errors import ConfigError

        raise ConfigError(f"Unknown device '{device}': choose auto, CPU or GPU.")
    return names.get(choice, choice)


def engineExplainMethod(explain: str | None) -> str | None:
    """The engine's method name, or None for no explanation ('none' or None)."""
    if explain is None or explain == "none":
        return None
    if explain not in EXPLAIN_METHODS:
        from fmct.errors import ConfigError

        raise ConfigError(f"Unknown explanation method '{explain}': choose one of {', '.join(EXPLAIN_METHODS)}.")
    return explain


def bundlePathFromChoice(useDemoModel: bool, bundlePath: str | Path | None) -> Path | None:
    """The bundle the widget's choice means: None (the bundled demo model) or a chosen path."""
    if useDemoModel:
        return None
    text = str(bundlePath or "").strip()
    if text in ("", "."):  # an empty ctkPathLineEdit reads as Path("."), not as a bundle
        from fmct.errors import ConfigError

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


def shownFindingAfterAnalysis(findings: list[dict], explained: list[str]) -> str | None:
    """The overlay shown first: the explained finding the model is most confident about."""
    candidates = [f for f in findings if f["name"] in explained]
    if not candidates:
        return None
    return max(candidates, key=lambda f: f["probability"] - f["threshold"])["name"]


class FMCTLogic(ScriptedLoadableModuleLogic):
    """Runs FMCT on volume nodes and manages the output nodes. Usable without the widget."""

    def __init__(self, dependencies: DependencyLogic | None = None) -> None:
        super().__init__()
        self.dependencies = dependencies or DependencyLogic()
        self._analyzers: dict[tuple, object] = {}
        self._volumeRenderingLogics: dict[int, object] = {}
        self._cancelRequested = False

    # -- the one-click analysis ------------------------------------------------------------------

    def analyze(self, inputVolumeNode, bundlePath: str | Path | None = None, device: str = "auto",
                explain: str | None = DEFAULT_EXPLAIN, progress: Progress | None = None,
                cancel: CancelCheck | None = None, explainFindings: str | Sequence[str] = "positive") -> FMCTResult:
        """Analyze one CT node; fill (or update) its findings table and saliency volumes, show them.

        bundlePath: a model bundle folder or .zip; None for the bundled demo model.
        device: auto (GPU when present), CPU or GPU.
        explain: one of EXPLAIN_METHODS; saliency maps are made for the positive findings, or for
        explainFindings ("positive", "all", or a list of names: as the CLI's --findings).
        progress(fraction, message) is called as the work advances; cancel() -> True stops it
        (as does requestCancel()), raising fmct.errors.Cancelled and leaving earlier outputs as they were.
        """
        report = progress or (lambda fraction, message: None)
        self._cancelRequested = False
        self.dependencies.requireEngine()
        from fmct.volume import validate_ct

        started = time.perf_counter()
        report(0.0, "reading the input volume")
        volume = geometry.volumeFromNode(inputVolumeNode)
        validate_ct(volume, "The input volume")
        method = engineExplainMethod(explain)
        report(0.01, "loading the model")
        analyzer = self.analyzer(bundlePath, device)
        engineResult = analyzer.analyze(
            volume, explain_method=method, explain_findings=explainFindings,
            progress=lambda f, m: report(_LOAD_END + (_ENGINE_END - _LOAD_END) * f, m),
            cancel=lambda: self._cancelRequested or bool(cancel and cancel()),
        )
        report(_ENGINE_END, "creating output nodes")
        result = self._writeOutputs(inputVolumeNode, engineResult, analyzer)
        result.timings = {**engineResult.timings, "total_s": time.perf_counter() - started}
        log.info("FMCT: analyzed a %s volume with %s on %s in %.1f s; positive: %s", "x".join(map(str, volume.size)),
                 result.modelName, result.device, result.timings["total_s"], ", ".join(result.positive) or "none")
        report(1.0, "done")
        return result

    def requestCancel(self) -> None:
        """Ask a running analyze() to stop at the engine's next check (the widget's Cancel button)."""
        self._cancelRequested = True

    def analyzer(self, bundlePath: str | Path | None = None, device: str = "auto"):
        """A loaded engine Analyzer, kept for the next run with the same bundle file and device."""
        from fmct.analyze import Analyzer

        path = Path(bundlePath) if bundlePath else defaultBundlePath()
        key = (str(path.resolve()), _modificationTime(path), engineDevice(device))
        if key not in self._analyzers:
            self._analyzers.clear()  # one model in memory at a time: bundles can be large
            self._analyzers[key] = Analyzer(path, device=engineDevice(device))
        return self._analyzers[key]

    def _writeOutputs(self, inputNode, engineResult, analyzer) -> FMCTResult:
        findings = [
            {"name": f.name, "description": f.description, "probability": float(f.probability),
             "threshold": float(f.threshold), "positive": bool(f.positive)}
            for f in engineResult.findings
        ]
        tableNode = outputs.updateFindingsTable(inputNode, findings)
        saliencyNodes = outputs.updateSaliencyNodes(inputNode, engineResult.saliency)
        shown = shownFindingAfterAnalysis(findings, list(saliencyNodes))
        self.showFinding(inputNode, shown)
        return FMCTResult(findings, tableNode, saliencyNodes, shown, analyzer.bundle.meta.name, str(analyzer.device))

    # -- showing results --------------------------------------------------------------------------

    def showFinding(self, inputVolumeNode, finding: str | None) -> bool:
        """Overlay a finding's saliency on its CT in the slice views and volume-render it in 3D.

        A finding without a map (negative, or not explained) clears the overlay rather than
        leaving another finding's map on screen. Returns whether a map is shown.
        """
        nodes = outputs.saliencyNodes(inputVolumeNode)
        shown = finding if finding in nodes else None
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


def _modificationTime(path: Path) -> float:
    """Changes when a bundle is rewritten, so a retrained bundle at the same path is reloaded."""
    meta = path / "fmct.json" if path.is_dir() else path
    return meta.stat().st_mtime if meta.exists() else 0.0
