"""FMCTTraining: pretrain, fine-tune and evaluate FMCT models, headless or from a small panel.

The work is the engine's command line (`fmct pretrain|finetune|evaluate --config FILE`), run in a
separate process group by FMCTTrainingLib/logic.py, so a run of hours neither freezes Slicer nor
needs it: the same logic runs from `Slicer --no-main-window --python-script
<module folder>/scripts/<task>.py --config FILE`. The panel starts a run, polls its log and
progress with a timer, and Stop ends the whole process tree (after letting a pretraining run save
a checkpoint).

Like FMCT.py, this file loads on Slicers older than 5.10 only to say that FMCT needs 5.10.
"""
import sys
from pathlib import Path

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

UNSUPPORTED = unsupportedMessage(sys.version_info, applicationVersion())

if UNSUPPORTED is None:
    from typing import Annotated

    from slicer.parameterNodeWrapper import Choice, parameterNodeWrapper

    from FMCTTrainingLib.logic import TASKS, FMCTTrainingLogic, TrainingError

POLL_MS = 250


#
# FMCTTraining
#


class FMCTTraining(ScriptedLoadableModule):
    """Module metadata."""

    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = _("FMCT Training")
        self.parent.categories = [translate("qSlicerAbstractCoreModule", "Quantification")]
        self.parent.dependencies = ["FMCT"]  # shares FMCT's installer of torch and the engine
        self.parent.contributors = ["FMCT contributors (FMCT project)"]
        self.parent.helpText = _("""
Self-supervised pretraining, fine-tuning and evaluation of FMCT models with the fmct engine's
command line and config files. Runs in a separate process; for long runs use it headless, with the
scripts in the <code>scripts</code> folder next to this module's file:
<pre>Slicer --no-main-window --python-script &lt;module folder&gt;/scripts/pretrain.py --config Resources/Configs/pretrain_tiny.yaml</pre>
The example configs (pretrain_tiny.yaml, finetune_tiny.yaml, evaluate.yaml) are in the engine's
Resources/Configs (FMCTEngine/Resources/Configs in the extension).
""")
        if UNSUPPORTED is not None:
            self.parent.helpText = UNSUPPORTED
        else:
            from FMCTLib.dependencies import documentationUrl

            url = documentationUrl("#training-headless-fmct-training")
            if url:
                self.parent.helpText += f'<br>Documentation: <a href="{url}">{url}</a>'
        self.parent.acknowledgementText = _("Apache License 2.0; please cite FMCT and the FM-CT paper (CITATION.cff). "
                                            "Uses PyTorch and Captum.")


#
# FMCTTrainingParameterNode
#


if UNSUPPORTED is None:

    @parameterNodeWrapper
    class FMCTTrainingParameterNode:
        """task - pretrain, finetune or evaluate. configPath - its config file. extraArgs - more CLI options."""

        task: Annotated[str, Choice(list(TASKS))] = "pretrain"
        configPath: Path
        extraArgs: str = ""


#
# FMCTTrainingWidget
#


class FMCTTrainingWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    """Start a run in its own process group (Slicer stays responsive), poll its log and progress."""

    def __init__(self, parent=None) -> None:
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self.run = None
        self._timer = None
        self._parameterNode = None
        self._parameterNodeGuiTag = None

    def setup(self) -> None:
        ScriptedLoadableModuleWidget.setup(self)
        if UNSUPPORTED is not None:
            showUnsupported(self.layout, UNSUPPORTED)
            return
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/FMCTTraining.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)
        self.logic = FMCTTrainingLogic()
        self._timer = qt.QTimer()
        self._timer.setInterval(POLL_MS)
        self._timer.connect("timeout()", self.onPoll)
        self.ui.startButton.connect("clicked(bool)", self.onStart)
        self.ui.stopButton.connect("clicked(bool)", self.onStop)
        self.initializeParameterNode()

    def cleanup(self) -> None:
        self.removeObservers()
        if self._timer is not None:
            self._timer.stop()
        if self._running():
            self.run.stop()

    def onReload(self) -> None:
        """Reload FMCTTrainingLib's modules too (Slicer's Reload re-reads only FMCTTraining.py)."""
        import importlib

        for name in ("FMCTLib.process", "FMCTTrainingLib.logic", "FMCTTrainingLib.script", "FMCTTrainingLib.selftest"):
            if name in sys.modules:
                importlib.reload(sys.modules[name])
        ScriptedLoadableModuleWidget.onReload(self)

    def enter(self) -> None:
        if UNSUPPORTED is None:
            self.initializeParameterNode()

    def exit(self) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNodeGuiTag = None
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._updateButtons)

    def initializeParameterNode(self) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._updateButtons)
        self._parameterNode = FMCTTrainingParameterNode(self.logic.getParameterNode())
        self._parameterNodeGuiTag = self._parameterNode.connectGui(self.ui)
        self.addObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._updateButtons)
        self._updateButtons()

    def _running(self) -> bool:
        return self.run is not None and self.run.running

    def _updateButtons(self, caller=None, event=None) -> None:
        p = self._parameterNode
        enabled, reason = self.logic.canStart(p.task, p.configPath, self._running())
        self.ui.startButton.enabled = enabled
        self.ui.startButton.toolTip = reason
        self.ui.stopButton.enabled = self._running()
        self.ui.runCollapsibleButton.enabled = not self._running()

    def onStart(self) -> None:
        from FMCT import ensureDependencies
        from FMCTLib.dependencies import DependencyLogic

        if not ensureDependencies(DependencyLogic(), self._log):
            return
        p = self._parameterNode
        try:
            self.run = self.logic.start(p.task, p.configPath, self.logic.splitOptions(p.extraArgs))
        except (TrainingError, ValueError) as error:
            slicer.util.errorDisplay(str(error))
            return
        self.ui.logTextEdit.clear()
        self.ui.progressBar.value = 0
        self._log(_("Running: {command}").format(command=" ".join(self.run.command)))
        self._timer.start()
        self._updateButtons()

    def onStop(self) -> None:
        """Interrupt the run now; the timer's next polls kill its whole process tree if it has not
        stopped (after saving a checkpoint) within the grace period."""
        if self._running():
            self._log(_("Stopping (a pretraining run saves a checkpoint first)..."))
            self.run.requestStop()

    def onPoll(self) -> None:
        if self.run is None:
            self._timer.stop()
            return
        for event in self.run.poll():
            self._show(event)
        if self.run.running:
            return
        self._timer.stop()
        code = self.run.returncode
        self._log(_("Finished with exit code {code}.").format(code=code))
        if self.run.stopped:
            self.ui.statusLabel.text = _("Stopped.")
        elif code == 0:
            self.ui.statusLabel.text = _("Done.")
        else:
            self.ui.statusLabel.text = _("Failed (exit code {code}): see the log.").format(code=code)
        self._updateButtons()

    def _show(self, event) -> None:
        if event.line is not None:
            self._log(event.line)
        else:
            self.ui.progressBar.value = int(round(100 * event.fraction))
            self.ui.statusLabel.text = event.message

    def _log(self, line: str) -> None:
        self.ui.logTextEdit.appendPlainText(line)


#
# FMCTTrainingTest
#


class FMCTTrainingTest(ScriptedLoadableModuleTest):
    """The checks of FMCTTrainingLib/selftest.py: command, a real engine run, refusals, stop.

    Never installs anything (see FMCTTest): skipped, saying why, unless testing is enabled and
    the packages are in place.
    """

    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        from FMCT import FMCTTest

        reason = FMCTTest.skipReason()
        if reason:
            self.delayDisplay(f"FMCTTraining test skipped: {reason}")
            return
        self.setUp()
        self.test_FMCTTraining_logic()

    def test_FMCTTraining_logic(self):
        from FMCTTrainingLib import selftest

        selftest.runAll(log=self.delayDisplay)
        self.delayDisplay("FMCTTraining test passed")
