"""FMCT: analyze a head CT with the FMCT foundation model in one click.

Module (metadata), Widget (the panel: forwards clicks to the logic and shows progress; it
decides nothing), Test (Slicer's self-test, running the checks in FMCTLib/selftest.py).
All decisions and all MRML work are in FMCTLib/logic.py (FMCTLogic), which scripts and the
pytest suite use directly; the analysis itself runs in a separate process (FMCTLib/worker.py),
which the panel polls with a timer, so Slicer keeps repainting while the model works.

Nothing here imports torch or the fmct engine at module import: Slicer loads this module at
startup, before those packages are installed. They are installed on first use, after asking.

FMCT needs Slicer 5.10 or newer (Python 3.12). This file is kept loadable by older Slicers
(no syntax or annotation they cannot read before the version check), so that they show one
clear message in the module panel instead of a load error.
"""
import logging
import sys
import traceback
from pathlib import Path
from typing import Optional

import qt
import slicer
import vtk
from slicer.ScriptedLoadableModule import (
    ScriptedLoadableModule,
    ScriptedLoadableModuleTest,
    ScriptedLoadableModuleWidget,
)
from slicer.util import VTKObservationMixin

from FMCTLib.slicerversion import applicationVersion, showUnsupported, translate, unsupportedMessage
from FMCTLib.slicerversion import tr as _

# None on a Slicer that can run FMCT; else what the panel says instead of loading the rest.
UNSUPPORTED = unsupportedMessage(sys.version_info, applicationVersion())

if UNSUPPORTED is None:
    from typing import Annotated

    from slicer import vtkMRMLScalarVolumeNode, vtkMRMLTableNode
    from slicer.parameterNodeWrapper import Choice, parameterNodeWrapper

    from FMCTLib.logic import (
        DEFAULT_EXPLAIN,
        DEVICES,
        EXPLAIN_METHODS,
        FMCTLogic,
        bundlePathFromChoice,
        canAnalyze,
        canExplain,
        deviceNotice,
    )

# Polling interval of a running analysis: short enough for a smooth progress bar, long enough
# to cost nothing (each poll reads a queue; it never waits on the worker).
POLL_MS = 100


#
# FMCT
#


class FMCT(ScriptedLoadableModule):
    """Module metadata. Uses ScriptedLoadableModule base class, available at:
    https://github.com/Slicer/Slicer/blob/main/Base/Python/slicer/ScriptedLoadableModule.py
    """

    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = _("FMCT Head CT")
        self.parent.categories = [translate("qSlicerAbstractCoreModule", "Quantification")]
        self.parent.dependencies = []
        self.parent.contributors = ["FMCT contributors (FMCT project)"]
        self.parent.helpText = _("""
Finds intracranial hemorrhage (and its subtypes), skull fracture, mass effect and midline shift on a
non-contrast head CT with the FMCT 3D foundation model, and shows where the model looked: select the
CT, click <b>Analyze</b>. Results: a findings table, and saliency maps shown as a heat overlay over
the CT and rendered in 3D; select a finding in the table to switch. Without a GPU only the top finding
is explained at first: select another and click <b>Explain selected finding</b>.
<br><b>Research software: not for clinical use.</b> The bundled demo model is trained on synthetic CTs.
""")
        if UNSUPPORTED is not None:
            self.parent.helpText = UNSUPPORTED
        if UNSUPPORTED is None:
            from FMCTLib.dependencies import documentationUrl

            url = documentationUrl("#fmct-in-3d-slicer")
            if url:
                self.parent.helpText += f'<br>Documentation: <a href="{url}">{url}</a>'
            slicer.app.connect("startupCompleted()", registerSampleData)
        self.parent.acknowledgementText = _("""
Built after "3D Foundation Model for Generalizable Disease Detection in Head Computed Tomography"
(FM-CT; Nature Biomedical Engineering 2026, arXiv:2502.02779): please cite it and FMCT (CITATION.cff).
Apache License 2.0. Uses PyTorch and Captum.
""")


def registerSampleData():
    """Add "FMCT synthetic head CT" to the Sample Data module (made on the spot: no download, no patient data)."""
    import SampleData

    from FMCTLib.logic import SAMPLE_NAME

    iconsPath = Path(__file__).parent / "Resources" / "Icons"
    SampleData.SampleDataLogic.registerCustomSampleDataSource(
        category="FMCT", sampleName=SAMPLE_NAME, uris="fmct-phantom://subdural", fileNames="FMCT-synthetic-head-CT.nrrd",
        nodeNames=SAMPLE_NAME, thumbnailFileName=str(iconsPath / "FMCT.png"), loadFileType="VolumeFile",
        customDownloader=loadSyntheticHeadCT)


def loadSyntheticHeadCT(source=None):
    """Sample Data's button: make and show the CT. Needs only numpy and SimpleITK, which Slicer
    ships: no PyTorch install dialog before a user has even seen a CT (Analyze asks for it)."""
    logic = FMCTLogic()
    folder = Path(slicer.mrmlScene.GetCacheManager().GetRemoteCacheDirectory()) / "FMCT"
    with slicer.util.WaitCursor():
        node = logic.loadSyntheticHeadCT(slicer.mrmlScene, folder)
    slicer.util.setSliceViewerLayers(background=node, fit=True)
    return node


def ensureDependencies(dependencies, status=logging.info) -> bool:
    """Ask before installing torch and the engine's requirements, then install them (FMCTTraining uses it too).

    Returns whether everything is in place; False if the user declined or installing failed
    (the failure is shown once, with its details, and not raised again).
    """
    def confirm(message, details):
        return slicer.util.confirmOkCancelDisplay(message, _("FMCT: install Python packages"), detailedText=details)

    def showError(message, details):
        slicer.util.errorDisplay(message, detailedText=details or None)

    return dependencies.ensure(confirm, showError, log=status)


#
# FMCTParameterNode
#

if UNSUPPORTED is None:

    @parameterNodeWrapper
    class FMCTParameterNode:
        """What the panel shows, saved with the scene.

        inputVolume - the CT to analyze.
        useDemoModel - use the bundled demo model instead of bundlePath.
        bundlePath - a model bundle folder (or .zip).
        device - auto, CPU or GPU.
        explainMethod - saliency method, or none.
        findingsTable - the findings table of the last analysis (shown in the panel).
        """

        inputVolume: vtkMRMLScalarVolumeNode
        useDemoModel: bool = True
        bundlePath: Path
        device: Annotated[str, Choice(list(DEVICES))] = "auto"
        explainMethod: Annotated[str, Choice(list(EXPLAIN_METHODS))] = DEFAULT_EXPLAIN
        findingsTable: vtkMRMLTableNode


#
# FMCTWidget
#


class FMCTWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    """The panel. Uses ScriptedLoadableModuleWidget base class, available at:
    https://github.com/Slicer/Slicer/blob/main/Base/Python/slicer/ScriptedLoadableModule.py
    """

    def __init__(self, parent=None) -> None:
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self._parameterNode = None
        self._parameterNodeGuiTag = None
        self._job = None
        self._timer = None

    def setup(self) -> None:
        ScriptedLoadableModuleWidget.setup(self)
        if UNSUPPORTED is not None:
            showUnsupported(self.layout, UNSUPPORTED)
            return
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/FMCT.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)

        self.logic = FMCTLogic()
        self.logic.warmUpInBackground()
        self._timer = qt.QTimer()
        self._timer.setInterval(POLL_MS)
        self._timer.connect("timeout()", self.onPoll)

        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)
        self.ui.analyzeButton.connect("clicked(bool)", self.onAnalyzeButton)
        self.ui.cancelButton.connect("clicked(bool)", self.onCancelButton)
        self.ui.explainSelectedButton.connect("clicked(bool)", self.onExplainSelectedButton)
        self.ui.segmentationButton.connect("clicked(bool)", self.onSegmentationButton)
        self.ui.findingsTableView.connect("selectionChanged()", self.onFindingSelected)

        self.initializeParameterNode()

    def cleanup(self) -> None:
        self.removeObservers()
        if self.logic is not None:
            self.logic.requestCancel()  # closing Slicer ends a running analysis, not the other way round
            self.logic.stopWorker()  # and the warm worker that waits for the next click
        if self._timer is not None:
            self._timer.stop()

    def onReload(self) -> None:
        """Reload FMCTLib's modules too (Slicer's Reload re-reads only FMCT.py), dependencies first."""
        import importlib

        for name in ("slicerversion", "geometry", "process", "dependencies", "outputs", "worker", "warmworker", "logic",
                     "selftest"):
            module = sys.modules.get(f"FMCTLib.{name}")
            if module is not None:
                importlib.reload(module)
        ScriptedLoadableModuleWidget.onReload(self)

    def enter(self) -> None:
        if UNSUPPORTED is None:
            self.initializeParameterNode()

    def exit(self) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNodeGuiTag = None
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._updateButtons)

    def onSceneStartClose(self, caller, event) -> None:
        self.logic.requestCancel()  # the results would have no scene to go to
        self.setParameterNode(None)

    def onSceneEndClose(self, caller, event) -> None:
        if self.parent.isEntered:
            self.initializeParameterNode()

    def initializeParameterNode(self) -> None:
        self.setParameterNode(FMCTParameterNode(self.logic.getParameterNode()))
        if not self._parameterNode.inputVolume:
            firstVolumeNode = slicer.mrmlScene.GetFirstNodeByClass("vtkMRMLScalarVolumeNode")
            if firstVolumeNode and not firstVolumeNode.IsA("vtkMRMLLabelMapVolumeNode"):
                self._parameterNode.inputVolume = firstVolumeNode

    def setParameterNode(self, inputParameterNode: Optional["FMCTParameterNode"]) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._updateButtons)
        self._parameterNode = inputParameterNode
        if self._parameterNode:
            self._parameterNodeGuiTag = self._parameterNode.connectGui(self.ui)
            self.addObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._updateButtons)
            if self._parameterNode.findingsTable:
                self.ui.findingsTableView.setMRMLTableNode(self._parameterNode.findingsTable)
            self._updateButtons()

    def _running(self) -> bool:
        return self._job is not None

    def _updateButtons(self, caller=None, event=None) -> None:
        p = self._parameterNode
        enabled, reason = canAnalyze(p.inputVolume if p else None, p.useDemoModel if p else True,
                                     p.bundlePath if p else None, self._running())
        self.ui.analyzeButton.enabled = enabled
        self.ui.analyzeButton.toolTip = reason
        self.ui.cancelButton.enabled = self._running()
        explainEnabled, explainReason = canExplain(self.ui.findingsTableView.mrmlTableNode(),
                                                   self._selectedTableRow(), self._running())
        self.ui.explainSelectedButton.enabled = explainEnabled
        self.ui.explainSelectedButton.toolTip = explainReason
        self.ui.segmentationButton.enabled = not self._running() and self._shownMap() is not None

    # -- Analyze, Explain, Cancel, progress --------------------------------------------------------

    def onAnalyzeButton(self) -> None:
        """Install what is missing (after asking), then start the analysis with the panel's choices."""
        if not self._ensureDependencies():
            return
        p = self._parameterNode
        self._start(lambda: self.logic.startAnalysis(
            p.inputVolume, bundlePath=bundlePathFromChoice(p.useDemoModel, p.bundlePath),
            device=p.device, explain=p.explainMethod))

    def onExplainSelectedButton(self) -> None:
        """Compute the selected finding's map (on a CPU the first click explains only the top one)."""
        if not self._ensureDependencies():
            return
        p = self._parameterNode
        table = self.ui.findingsTableView.mrmlTableNode()
        from FMCTLib import outputs

        finding = outputs.findingAtRow(table, self._selectedTableRow())
        ct = outputs.inputNodeOf(table)
        method = p.explainMethod if p.explainMethod != "none" else DEFAULT_EXPLAIN
        self._start(lambda: self.logic.explainFinding(
            ct, finding, bundlePath=bundlePathFromChoice(p.useDemoModel, p.bundlePath), device=p.device,
            explain=method))

    def _start(self, startJob) -> None:
        from fmct.conventions.errors import FMCTError

        try:
            self._job = startJob()
        except FMCTError as error:  # a user mistake, refused before any process started
            slicer.util.errorDisplay(str(error))
            return
        except Exception as error:
            slicer.util.errorDisplay(_("FMCT analysis failed: {error}").format(error=error),
                                     detailedText=traceback.format_exc())
            return
        self.ui.progressBar.value = 0
        self.ui.deviceNoticeLabel.text = ""
        self.ui.inputsCollapsibleButton.enabled = False
        self._updateButtons()
        self._timer.start()

    def onPoll(self) -> None:
        """Show the worker's progress; when it has finished, load its results (one short step)."""
        job = self._job
        if job is None:
            self._timer.stop()
            return
        job.poll()
        self.ui.progressBar.value = int(round(100 * job.fraction))
        self.ui.statusLabel.text = job.message
        self.ui.deviceNoticeLabel.text = deviceNotice(job.gpu, job.explain, job.explainFindings)
        if job.running:
            return
        self._timer.stop()
        self._finish(job)

    def _finish(self, job) -> None:
        from fmct.conventions.errors import Cancelled, FMCTError

        try:
            result = self.logic.finishAnalysis(  # repaint between maps; no user input while loading
                job, between=lambda: slicer.app.processEvents(qt.QEventLoop.ExcludeUserInputEvents))
            if self._parameterNode is not None:
                self._parameterNode.findingsTable = result.tableNode
            self.ui.findingsTableView.setMRMLTableNode(result.tableNode)
            slicer.util.resetThreeDViews()  # centre the 3D view on the rendered map
            self.ui.progressBar.value = 100
            positive = ", ".join(result.positive) or _("none")
            self.ui.statusLabel.text = _("Done in {seconds:.0f} s. Positive: {positive}. Shown: {shown}.").format(
                seconds=result.timings.get("wall_s", 0.0), positive=positive, shown=result.shownFinding or _("none"))
            notice = [self.ui.deviceNoticeLabel.text] if self.ui.deviceNoticeLabel.text else []
            notice += [f"<b>{result.banner}</b>"] if result.banner else []  # the model's intended use, above the table
            notice += [line if line.split(": ", 1)[1].startswith("ok") else f'<font color="#c00000">{line}</font>'
                       for line in result.checkLines()]
            self.ui.deviceNoticeLabel.text = "<br>".join(notice)
            if result.warning:  # the engine's words: the findings are unreliable for this CT
                self.ui.deviceNoticeLabel.text = "<br>".join([f'<b><font color="#c00000">{result.warning}</font></b>', *notice])
                slicer.util.warningDisplay(result.warning, windowTitle=_("FMCT: out-of-distribution CT"))
        except Cancelled:
            self.ui.statusLabel.text = _("Cancelled.")
        except FMCTError as error:  # a user mistake: the message says what to do
            self.ui.statusLabel.text = ""
            slicer.util.errorDisplay(str(error))
        except Exception as error:
            self.ui.statusLabel.text = ""
            slicer.util.errorDisplay(_("FMCT analysis failed: {error}").format(error=error),
                                     detailedText=traceback.format_exc())
        finally:
            self._job = None
            self.ui.inputsCollapsibleButton.enabled = True
            self._updateButtons()

    def onCancelButton(self) -> None:
        """Kill the analysis process now; the next poll reports it and the scene keeps its earlier results."""
        self.logic.requestCancel()
        self.ui.statusLabel.text = _("Cancelling...")

    def _ensureDependencies(self) -> bool:
        return ensureDependencies(self.logic.dependencies, self._showInstallStep)

    def _showInstallStep(self, message: str) -> None:
        self.ui.statusLabel.text = message
        slicer.app.processEvents()  # the installer blocks; show which step it is on

    # -- Findings table -------------------------------------------------------------------------

    def onFindingSelected(self) -> None:
        """Show the selected finding's map (the logic decides what that means)."""
        tableNode = self.ui.findingsTableView.mrmlTableNode()
        finding = self.logic.showFindingAtRow(tableNode, self._selectedTableRow())
        if finding:
            self.ui.statusLabel.text = _("Showing: {finding}").format(finding=finding)
        self._updateButtons()

    def onSegmentationButton(self) -> None:
        shown = self._shownMap()
        if shown is None:
            return
        ct, finding = shown
        segmentation = self.logic.saliencyToSegmentation(ct, finding)
        self.ui.statusLabel.text = _("Segmentation: {name}").format(name=segmentation.GetName())

    def _shownMap(self):
        """(CT node, finding) of the map on screen, or None."""
        from FMCTLib import outputs

        ct = outputs.inputNodeOf(self.ui.findingsTableView.mrmlTableNode())
        finding = self.logic.shownFinding(ct) if ct is not None else None
        return (ct, finding) if finding else None

    def _selectedTableRow(self) -> int:
        """The table node row of the view's current row (the view may sort its rows)."""
        view = self.ui.findingsTableView
        index = view.currentIndex()
        if not index.isValid():
            return -1
        return view.sortFilterProxyModel().mapToSource(index).row()


#
# FMCTTest
#


class FMCTTest(ScriptedLoadableModuleTest):
    """Slicer's self-test: the checks of FMCTLib/selftest.py on the application's scene, then the
    panel driven as a user would. Uses ScriptedLoadableModuleTest base class, available at:
    https://github.com/Slicer/Slicer/blob/main/Base/Python/slicer/ScriptedLoadableModule.py

    It never installs anything: "Reload and Test" (and the extension build machines, which run
    the tests of every extension) must not download gigabytes of PyTorch. It runs where testing
    is enabled and torch and the engine's requirements are already in place, and otherwise says
    why it is skipped.
    """

    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        reason = self.skipReason()
        if reason:
            self.delayDisplay(f"FMCT test skipped: {reason}")
            return
        self.setUp()
        self.test_FMCT_logic()
        self.setUp()
        self.test_FMCT_panel()

    @staticmethod
    def skipReason() -> str:
        if UNSUPPORTED is not None:
            return UNSUPPORTED
        from FMCTLib.dependencies import DependencyLogic

        return DependencyLogic().selfTestSkipReason(slicer.app.testingEnabled())

    def test_FMCT_logic(self):
        """Findings table, saliency geometry and values, overlays, 3D, re-runs, cancel, bad input."""
        from FMCTLib import selftest

        selftest.runAll(slicer.mrmlScene, log=self.delayDisplay)
        self.delayDisplay("FMCT logic test passed")

    def test_FMCT_panel(self):
        """Select a CT and a bundle in the panel, click Analyze, wait for the worker, select a finding."""
        import tempfile
        import time

        from FMCTLib import outputs, selftest

        slicer.util.selectModule("FMCT")
        widget = slicer.util.getModuleWidget("FMCT")
        with tempfile.TemporaryDirectory(prefix="fmct-paneltest-") as work:
            bundle = selftest.tinyBundle(work)
            ct = selftest.loadAsNRRD(slicer.mrmlScene, selftest.phantom().volume, work)
            widget.ui.inputSelector.setCurrentNode(ct)
            widget.ui.useDemoModelCheckBox.checked = False
            widget.ui.bundlePathLineEdit.currentPath = str(bundle)
            widget.ui.deviceComboBox.currentText = "CPU"
            widget.ui.explainComboBox.currentText = "occlusion"  # one map per finding (attention: one for all)
            self.assertTrue(widget.ui.analyzeButton.enabled)
            widget.ui.analyzeButton.click()
            self.assertTrue(widget.ui.cancelButton.enabled, "Cancel is offered while the worker runs")
            deadline = time.monotonic() + 300
            while widget._job is not None and time.monotonic() < deadline:
                slicer.app.processEvents()  # the panel's timer polls the worker; the GUI stays live
                time.sleep(0.02)
            table = widget.ui.findingsTableView.mrmlTableNode()
            self.assertIsNotNone(table)
            self.assertIs(table, outputs.findingsTableNode(ct))
            self.assertEqual(table.GetNumberOfRows(), len(selftest.TINY_TASKS))
            widget.ui.findingsTableView.selectRow(1)
            shown = widget.logic.shownFinding(ct)
            self.assertEqual(shown, outputs.findingAtRow(table, 1))
        self.delayDisplay("FMCT panel test passed")
