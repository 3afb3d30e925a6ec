"""FMCT: analyze a head CT with the FMCT foundation model in one click.

Module (metadata), Widget (the panel: forwards clicks to the logic and shows progress; it
decides nothing), Test (Slicer's self-test, running the checks in FMCTLib/selftest.py).
All decisions and all MRML work are in FMCTLib/logic.py (FMCTLogic), which scripts and the
pytest suite use directly.

Nothing here imports torch or the fmct engine at module import: Slicer loads this module at
startup, before those packages are installed. They are installed on first use, after asking.
"""
import logging
import traceback
from pathlib import Path
from typing import Annotated

import slicer
import vtk
from slicer import vtkMRMLScalarVolumeNode, vtkMRMLTableNode
from slicer.i18n import tr as _
from slicer.i18n import translate
from slicer.parameterNodeWrapper import Choice, parameterNodeWrapper
from slicer.ScriptedLoadableModule import (
    ScriptedLoadableModule,
    ScriptedLoadableModuleTest,
    ScriptedLoadableModuleWidget,
)
from slicer.util import VTKObservationMixin

from FMCTLib.dependencies import MissingDependencyError
from FMCTLib.logic import (
    DEFAULT_EXPLAIN,
    DEVICES,
    EXPLAIN_METHODS,
    FMCTLogic,
    bundlePathFromChoice,
    canAnalyze,
)


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
        self.parent.contributors = ["FMCT contributors"]
        self.parent.helpText = _("""
Finds intracranial hemorrhage (and its subtypes), skull fracture, mass effect and midline shift on a
non-contrast head CT with the FMCT 3D foundation model, and shows where the model looked: select the
CT, click <b>Analyze</b>. Results: a findings table, and for each positive finding a saliency map
shown as a heat overlay over the CT and rendered in 3D; select a finding in the table to switch.
<br><b>Research software: not for clinical use.</b> The bundled demo model is trained on synthetic CTs.
""")
        self.parent.acknowledgementText = _("""
Built after "3D Foundation AI Model for Generalizable Disease Detection in Head Computed Tomography"
(FM-CT, 2025). Uses PyTorch, MONAI and Captum.
""")


def ensureDependencies(dependencies, status=logging.info) -> bool:
    """Ask before installing torch and the fmct engine, then install them (FMCTTraining uses it too).

    Returns whether everything is in place; False if the user declined or installing failed.
    """
    try:
        plan = dependencies.installPlan()
    except MissingDependencyError as error:
        slicer.util.errorDisplay(str(error))
        return False
    if not plan:
        return True
    message, details = dependencies.confirmationText(plan)
    if not slicer.util.confirmOkCancelDisplay(message, _("FMCT: install Python packages"), detailedText=details):
        return False
    with slicer.util.tryWithErrorDisplay(_("Installing FMCT's Python packages failed."), waitCursor=True):
        dependencies.install(plan, log=status)
        return True
    return False


#
# FMCTParameterNode
#


@parameterNodeWrapper
class FMCTParameterNode:
    """What the panel shows, saved with the scene.

    inputVolume - the CT to analyze.
    useDemoModel - use the bundled demo model instead of bundlePath.
    bundlePath - a model bundle folder (or .zip).
    device - auto, CPU or GPU.
    explainMethod - saliency method for positive findings, or none.
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
        self._running = False

    def setup(self) -> None:
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/FMCT.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)

        self.logic = FMCTLogic()

        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)
        self.ui.analyzeButton.connect("clicked(bool)", self.onAnalyzeButton)
        self.ui.cancelButton.connect("clicked(bool)", self.onCancelButton)
        self.ui.findingsTableView.connect("selectionChanged()", self.onFindingSelected)

        self.initializeParameterNode()

    def cleanup(self) -> None:
        self.removeObservers()

    def enter(self) -> None:
        self.initializeParameterNode()

    def exit(self) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNodeGuiTag = None
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._updateButtons)

    def onSceneStartClose(self, caller, event) -> None:
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

    def setParameterNode(self, inputParameterNode: FMCTParameterNode | None) -> None:
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

    def _updateButtons(self, caller=None, event=None) -> None:
        p = self._parameterNode
        enabled, reason = canAnalyze(p.inputVolume if p else None, p.useDemoModel if p else True,
                                     p.bundlePath if p else None, self._running)
        self.ui.analyzeButton.enabled = enabled
        self.ui.analyzeButton.toolTip = _(reason)
        self.ui.cancelButton.enabled = self._running

    # -- Analyze, Cancel, progress ----------------------------------------------------------------

    def onAnalyzeButton(self) -> None:
        """Install what is missing (after asking), then run the logic with the panel's choices."""
        if not self._ensureDependencies():
            return
        from fmct.errors import Cancelled, FMCTError

        p = self._parameterNode
        self._setRunning(True)
        try:
            result = self.logic.analyze(
                p.inputVolume, bundlePath=bundlePathFromChoice(p.useDemoModel, p.bundlePath),
                device=p.device, explain=p.explainMethod, progress=self.onProgress)
            p.findingsTable = result.tableNode
            self.ui.findingsTableView.setMRMLTableNode(result.tableNode)
            slicer.util.resetThreeDViews()  # centre the 3D view on the rendered map
            positive = ", ".join(result.positive) or _("none")
            self.ui.statusLabel.text = _("Done in {seconds:.0f} s. Positive: {positive}.").format(
                seconds=result.timings.get("total_s", 0.0), positive=positive)
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
            self._setRunning(False)

    def onCancelButton(self) -> None:
        self.logic.requestCancel()
        self.ui.statusLabel.text = _("Cancelling...")

    def onProgress(self, fraction: float, message: str) -> None:
        """The engine's progress(fraction, message), on the progress bar.

        Processing events here keeps Slicer responsive and lets the Cancel button be clicked
        while the analysis runs on this thread.
        """
        self.ui.progressBar.value = int(round(100 * fraction))
        self.ui.statusLabel.text = message
        slicer.app.processEvents()

    def _setRunning(self, running: bool) -> None:
        self._running = running
        if running:
            self.ui.progressBar.value = 0
        self.ui.inputsCollapsibleButton.enabled = not running
        self._updateButtons()

    def _ensureDependencies(self) -> bool:
        return ensureDependencies(self.logic.dependencies, self._showInstallStep)

    def _showInstallStep(self, message: str) -> None:
        self.ui.statusLabel.text = message
        slicer.app.processEvents()

    # -- Findings table -------------------------------------------------------------------------

    def onFindingSelected(self) -> None:
        """Show the selected finding's map (the logic decides what that means)."""
        tableNode = self.ui.findingsTableView.mrmlTableNode()
        finding = self.logic.showFindingAtRow(tableNode, self._selectedTableRow())
        if finding:
            self.ui.statusLabel.text = _("Showing: {finding}").format(finding=finding)

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
    """

    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        self.setUp()
        self.test_FMCT_logic()
        self.setUp()
        self.test_FMCT_panel()

    def _installDependencies(self):
        logic = FMCTLogic()
        if logic.dependencies.installPlan():
            self.delayDisplay("Installing torch and the fmct engine")
            logic.dependencies.install(log=logging.info)

    def test_FMCT_logic(self):
        """Findings table, saliency geometry and values, overlays, 3D, re-runs, bad input."""
        self._installDependencies()
        from FMCTLib import selftest

        selftest.runAll(slicer.mrmlScene, log=self.delayDisplay)
        self.delayDisplay("FMCT logic test passed")

    def test_FMCT_panel(self):
        """Select a CT and a bundle in the panel, click Analyze, select a finding in the table."""
        import tempfile

        from FMCTLib import outputs, selftest

        self._installDependencies()
        slicer.util.selectModule("FMCT")
        widget = slicer.util.getModuleWidget("FMCT")
        with tempfile.TemporaryDirectory(prefix="fmct-paneltest-") as work:
            bundle = selftest.tinyBundle(work)
            ct = selftest.loadAsNRRD(slicer.mrmlScene, selftest.phantom().volume, work)
            widget.ui.inputSelector.setCurrentNode(ct)
            widget.ui.useDemoModelCheckBox.checked = False
            widget.ui.bundlePathLineEdit.currentPath = str(bundle)
            widget.ui.deviceComboBox.currentText = "CPU"
            widget.ui.explainComboBox.currentText = "attention"
            self.assertTrue(widget.ui.analyzeButton.enabled)
            widget.ui.analyzeButton.click()
            table = widget.ui.findingsTableView.mrmlTableNode()
            self.assertIsNotNone(table)
            self.assertIs(table, outputs.findingsTableNode(ct))
            self.assertEqual(table.GetNumberOfRows(), len(selftest.TINY_TASKS))
            widget.ui.findingsTableView.selectRow(1)
            shown = widget.logic.shownFinding(ct)
            self.assertEqual(shown, outputs.findingAtRow(table, 1))
        self.delayDisplay("FMCT panel test passed")
