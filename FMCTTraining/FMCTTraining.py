"""FMCTTraining: pretrain, fine-tune and evaluate FMCT models, headless or from a small panel.

The work is the engine's command line (`fmct pretrain|finetune|evaluate --config FILE`), run in a
separate process by FMCTTrainingLib/logic.py, so a run of hours neither freezes Slicer nor needs
it: the same logic runs from `Slicer --no-main-window --python-script
FMCTTraining/scripts/<task>.py --config FILE`. The panel starts a run and follows its log.
"""
import codecs
from pathlib import Path
from typing import Annotated

import qt
import slicer
import vtk
from slicer.i18n import tr as _
from slicer.i18n import translate
from slicer.parameterNodeWrapper import Choice, parameterNodeWrapper
from slicer.ScriptedLoadableModule import (
    ScriptedLoadableModule,
    ScriptedLoadableModuleTest,
    ScriptedLoadableModuleWidget,
)
from slicer.util import VTKObservationMixin

from FMCTTrainingLib.logic import TASKS, FMCTTrainingLogic, OutputParser, TrainingError


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
        self.parent.contributors = ["FMCT contributors"]
        self.parent.helpText = _("""
Self-supervised pretraining, fine-tuning and evaluation of FMCT models with the fmct engine's
command line and config files. Runs in a separate process; for long runs use it headless:
<pre>Slicer --no-main-window --python-script FMCTTraining/scripts/pretrain.py --config pretrain.yaml</pre>
""")
        self.parent.acknowledgementText = _("Uses PyTorch, MONAI and Captum.")


#
# FMCTTrainingParameterNode
#


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
    """Start a run in a QProcess (so Slicer stays responsive) and follow its log and progress."""

    def __init__(self, parent=None) -> None:
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self.process = None
        self._parameterNode = None
        self._parameterNodeGuiTag = None

    def setup(self) -> None:
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/FMCTTraining.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)
        self.logic = FMCTTrainingLogic()
        self.ui.startButton.connect("clicked(bool)", self.onStart)
        self.ui.stopButton.connect("clicked(bool)", self.onStop)
        self.initializeParameterNode()

    def cleanup(self) -> None:
        self.removeObservers()
        if self._running():
            self.process.terminate()

    def enter(self) -> None:
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
        return self.process is not None and self.process.state() != qt.QProcess.NotRunning

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
            self.logic.checkCommand(p.task)
            command = self.logic.command(p.task, p.configPath, self.logic.splitOptions(p.extraArgs))
        except (TrainingError, ValueError) as error:
            slicer.util.errorDisplay(str(error))
            return
        self.ui.logTextEdit.clear()
        self.ui.progressBar.value = 0
        self._log(_("Running: {command}").format(command=" ".join(command)))
        self._parser = OutputParser()
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.process = qt.QProcess()
        self.process.setProcessChannelMode(qt.QProcess.MergedChannels)
        environment = qt.QProcessEnvironment.systemEnvironment()
        for key, value in self.logic.environment().items():
            environment.insert(key, value)
        self.process.setProcessEnvironment(environment)
        self.process.connect("readyReadStandardOutput()", self.onOutput)
        self.process.connect("finished(int,QProcess::ExitStatus)", self.onFinished)
        self.process.start(command[0], command[1:])
        self._updateButtons()

    def onStop(self) -> None:
        if self._running():
            self._log(_("Stopping..."))
            self.process.terminate()
            qt.QTimer.singleShot(10000, lambda: self._running() and self.process.kill())

    def onOutput(self) -> None:
        text = self._decoder.decode(self.process.readAllStandardOutput().data())
        for event in self._parser.feed(text):
            self._show(event)

    def onFinished(self, exitCode, exitStatus) -> None:
        for event in self._parser.flush():
            self._show(event)
        self._log(_("Finished with exit code {code}.").format(code=exitCode))
        self.ui.statusLabel.text = _("Done.") if exitCode == 0 else _("Failed (exit code {code}): see the log.").format(code=exitCode)
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
    """The checks of FMCTTrainingLib/selftest.py: command, a real engine run, refusals, cancel."""

    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        self.setUp()
        self.test_FMCTTraining_logic()

    def test_FMCTTraining_logic(self):
        from FMCTLib.dependencies import DependencyLogic

        dependencies = DependencyLogic()
        if dependencies.installPlan():
            dependencies.install()
        from FMCTTrainingLib import selftest

        selftest.runAll(log=self.delayDisplay)
        self.delayDisplay("FMCTTraining test passed")
