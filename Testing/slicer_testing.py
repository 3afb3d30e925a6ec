"""A headless Slicer for the tests: a real MRML scene with what the application would set up.

`slicer-core` (PyPI) gives MRML and the module logics but no application. The application, at
startup, creates an application logic, the Colors and Volumes logics, a layout with its view
nodes, and one slice logic per slice view (which makes the slice composite nodes where
foreground and background layers are chosen). HeadlessSlicer does the same with the same
classes, so FMCTLogic meets the scene it meets inside Slicer. Nothing is mocked.
"""
from __future__ import annotations

import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
for _module_dir in (REPO / "FMCT", REPO / "FMCTTraining"):
    if str(_module_dir) not in sys.path:
        sys.path.insert(0, str(_module_dir))

import slicer  # noqa: E402
import vtk  # noqa: E402


@dataclass
class HeadlessSlicer:
    scene: object
    appLogic: object
    colorLogic: object
    volumesLogic: object
    sliceLogics: dict = field(default_factory=dict)  # layout name (Red, Yellow, Green) -> vtkMRMLSliceLogic
    keepAlive: tuple = ()  # logics that observe the scene live as long as it does

    def close(self) -> None:
        """Tear down in the application's order: nodes first, then the logics that observed them.

        Left to Python's garbage collector, a slice logic may outlive the scene whose volume it
        is showing, and VTK then crashes in its destructor; Slicer's own shutdown avoids this the
        same way, by closing the scene before deleting the logics.
        """
        self.scene.Clear(0)
        for logic in self.sliceLogics.values():
            logic.SetMRMLScene(None)
        for logic in (*self.keepAlive, self.volumesLogic, self.colorLogic, self.appLogic):
            if hasattr(logic, "SetMRMLScene"):
                logic.SetMRMLScene(None)
        if getattr(slicer, "mrmlScene", None) is self.scene:
            slicer.mrmlScene = None

    def __enter__(self) -> "HeadlessSlicer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def headless_slicer() -> HeadlessSlicer:
    """A fresh scene, installed as slicer.mrmlScene, with slice views, colours and volume loading."""
    scene = slicer.vtkMRMLScene()
    slicer.mrmlScene = scene
    resources = Path(tempfile.mkdtemp(prefix="fmct-slicer-"))  # no colour files ship with slicer-core
    (resources / "ColorFiles").mkdir()
    app = slicer.vtkSlicerApplicationLogic()
    app.SetHomeDirectory(str(resources))
    app.SetShareDirectory(".")
    app.SetMRMLScene(scene)
    colors = slicer.vtkSlicerColorLogic()
    colors.SetMRMLApplicationLogic(app)
    colors.SetMRMLScene(scene)
    app.SetColorLogic(colors)
    app.SetModuleLogic("Colors", colors)
    volumes = slicer.vtkSlicerVolumesLogic()
    volumes.SetMRMLApplicationLogic(app)
    volumes.SetMRMLScene(scene)
    app.SetModuleLogic("Volumes", volumes)
    layout = slicer.vtkMRMLLayoutLogic()
    layout.SetMRMLScene(scene)  # creates the layout node, the 3D view node and the slice nodes
    slice_logics, collection = {}, vtk.vtkCollection()
    for i in range(scene.GetNumberOfNodesByClass("vtkMRMLSliceNode")):
        slice_node = scene.GetNthNodeByClass(i, "vtkMRMLSliceNode")
        logic = slicer.vtkMRMLSliceLogic()
        logic.SetMRMLApplicationLogic(app)
        logic.SetMRMLScene(scene)
        logic.SetSliceNode(slice_node)  # creates the view's slice composite node
        slice_logics[slice_node.GetLayoutName()] = logic
        collection.AddItem(logic)
    app.SetSliceLogics(collection)
    return HeadlessSlicer(scene, app, colors, volumes, slice_logics, keepAlive=(layout, collection))
