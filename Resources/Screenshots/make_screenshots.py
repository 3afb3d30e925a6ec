"""Render the README / extension-index screenshot of the FMCT module, offscreen, from a real scene.

    python Resources/Screenshots/make_screenshots.py            # bundled demo model
    python Resources/Screenshots/make_screenshots.py --bundle path/to/bundle --finding subdural

What it shows is what the module leaves in Slicer after one click on Analyze: FMCTLogic runs on a
synthetic head CT in a headless MRML scene (slicer-core); the slice view is the Red slice logic's
blended layers (CT background, saliency foreground), the 3D view is Slicer's own 3D displayable
managers (volume rendering of the saliency map, the axial slice in 3D), rendered offscreen with
VTK (EGL or OSMesa; no display needed). Writes FMCT_slice.png, FMCT_3d.png and FMCT_analyze.png.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(REPO / "Testing"), str(REPO)]

from slicer_testing import headless_slicer  # noqa: E402  (also puts FMCT/ on sys.path)

import vtk  # noqa: E402
from vtk.util.numpy_support import vtk_to_numpy  # noqa: E402

import slicer  # noqa: E402
from FMCTLib import outputs, selftest  # noqa: E402
from FMCTLib.logic import FMCTLogic, defaultBundlePath  # noqa: E402

BRAIN_WINDOW = (80.0, 40.0)  # width, level in HU: how a head CT is read for bleeds
VIEW_SIZE = 560


def slice_view(app, ct, saliency_node) -> np.ndarray:
    """The Red (axial) slice view through the saliency peak, as its slice logic composites it."""
    saliency = slicer.util.arrayFromVolume(saliency_node)
    k, j, i = np.unravel_index(int(np.argmax(saliency)), saliency.shape)
    ras = selftest.geometry.nodeIJKToRAS(ct) @ np.array([i, j, k, 1.0])
    red = app.sliceLogics["Red"]
    red.GetSliceNode().SetDimensions(VIEW_SIZE, VIEW_SIZE, 1)
    red.FitSliceToBackground()
    red.SetSliceOffset(ras[2])
    producer = red.GetImageDataConnection().GetProducer()
    producer.Update()
    image = producer.GetOutputDataObject(0)
    nx, ny, _ = image.GetDimensions()
    rgba = vtk_to_numpy(image.GetPointData().GetScalars()).reshape(ny, nx, -1)
    return np.flipud(rgba[..., :3]).copy()  # VTK's first row is the bottom of the view


def three_d_view(app, logic, ct) -> np.ndarray:
    """Slicer's 3D view (its displayable managers), offscreen: the map volume-rendered and the
    axial slice shown in 3D, seen from the front-left and above."""
    scene = app.scene
    app.appLogic.SetModuleLogic("VolumeRendering", logic.volumeRenderingLogic(scene))
    window = vtk.vtkRenderWindow()
    window.SetOffScreenRendering(1)
    window.SetSize(VIEW_SIZE, VIEW_SIZE)
    renderer = vtk.vtkRenderer()
    window.AddRenderer(renderer)
    interactor = vtk.vtkRenderWindowInteractor()
    interactor.SetRenderWindow(window)
    factory = slicer.vtkMRMLThreeDViewDisplayableManagerFactory.GetInstance()
    factory.SetMRMLApplicationLogic(app.appLogic)
    for manager in ("vtkMRMLCameraDisplayableManager", "vtkMRMLViewDisplayableManager",
                    "vtkMRMLModelDisplayableManager",
                    "vtkMRMLVolumeRenderingDisplayableManager"):
        factory.RegisterDisplayableManager(manager)
    group = factory.InstantiateDisplayableManagers(renderer)
    view = scene.GetFirstNodeByClass("vtkMRMLViewNode")
    view.SetBoxVisible(False)
    app.sliceLogics["Red"].GetSliceNode().SetSliceVisible(True)
    group.SetMRMLDisplayableNode(view)
    camera = scene.GetFirstNodeByClass("vtkMRMLCameraNode")
    bounds = [0.0] * 6
    ct.GetRASBounds(bounds)
    centre = np.array(bounds).reshape(3, 2).mean(axis=1)
    camera.SetFocalPoint(*centre)
    camera.SetPosition(*(centre + np.array([-200.0, 300.0, 210.0])))  # from the front-left, above
    camera.SetViewUp(0.0, 0.0, 1.0)
    renderer.ResetCameraClippingRange()
    window.Render()
    window.Render()
    grab = vtk.vtkWindowToImageFilter()
    grab.SetInput(window)
    grab.Update()
    image = grab.GetOutput()
    nx, ny, _ = image.GetDimensions()
    rgb = vtk_to_numpy(image.GetPointData().GetScalars()).reshape(ny, nx, -1)[..., :3]
    group.SetMRMLDisplayableNode(None)
    return np.flipud(rgb).copy()


def compose(slice_rgb, view_rgb, result, finding: str, out: Path) -> None:
    """One picture: slice view, 3D view, and the findings table under them."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig = plt.figure(figsize=(11, 7.4), dpi=110, facecolor="white")
    grid = fig.add_gridspec(2, 2, height_ratios=[5.2, 2.2], hspace=0.08, wspace=0.03)
    for col, (image, title) in enumerate(((slice_rgb, f"Axial slice: {finding} saliency over the CT"),
                                          (view_rgb, "3D view: volume rendering of the saliency"))):
        ax = fig.add_subplot(grid[0, col])
        ax.imshow(image)
        ax.set_title(title, fontsize=11)
        ax.axis("off")
    ax = fig.add_subplot(grid[1, :])
    ax.axis("off")
    rows = [[f["name"], f"{f['probability']:.3f}", f"{f['threshold']:.3f}", "POSITIVE" if f["positive"] else "-"]
            for f in result.findings]
    table = ax.table(cellText=rows, colLabels=["finding", "probability", "threshold", "result"],
                     loc="center", cellLoc="center", colWidths=[0.28, 0.16, 0.16, 0.16])
    table.auto_set_font_size(False)
    table.set_fontsize(8.5)
    table.scale(1.0, 1.05)
    for row, f in enumerate(result.findings, start=1):
        if f["name"] == finding:
            for col in range(4):
                table[row, col].set_facecolor("#fde0c5")
    fig.suptitle(f"FMCT in 3D Slicer: one click on Analyze ({result.modelName}; synthetic head CT; research use only)",
                 fontsize=11.5)
    fig.savefig(out, bbox_inches="tight", facecolor="white")
    plt.close(fig)


def save_png(rgb: np.ndarray, path: Path) -> None:
    import matplotlib.pyplot as plt

    plt.imsave(path, rgb)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bundle", type=Path, default=None, help="model bundle (default: the bundled demo model)")
    parser.add_argument("--finding", default="subdural", help="finding to show (default: subdural)")
    parser.add_argument("--seed", type=int, default=20, help="seed of the synthetic CT (fmct demo's)")
    parser.add_argument("--explain", default="integrated_gradients")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent)
    args = parser.parse_args(argv)
    bundle = args.bundle or defaultBundlePath()

    with headless_slicer() as app, tempfile.TemporaryDirectory() as work:
        phantom = selftest.phantom(seed=args.seed, findings=[args.finding], inPlaneSize=256)
        ct = selftest.loadAsNRRD(app.scene, phantom.volume, work, name="Head CT", volumes=app.volumesLogic)
        display = ct.GetDisplayNode()
        display.AutoWindowLevelOff()
        display.SetWindowLevel(*BRAIN_WINDOW)
        logic = FMCTLogic()
        result = logic.analyze(ct, bundlePath=bundle, device="auto", explain=args.explain)
        if args.finding not in result.saliencyNodes:
            raise SystemExit(f"{args.finding} is not positive with {bundle}: {result.findings}")
        logic.showFinding(ct, args.finding)
        slice_rgb = slice_view(app, ct, result.saliencyNodes[args.finding])
        view_rgb = three_d_view(app, logic, ct)
        args.out.mkdir(parents=True, exist_ok=True)
        save_png(slice_rgb, args.out / "FMCT_slice.png")
        save_png(view_rgb, args.out / "FMCT_3d.png")
        compose(slice_rgb, view_rgb, result, args.finding, args.out / "FMCT_analyze.png")
        print(f"wrote {args.out / 'FMCT_analyze.png'} (model {result.modelName}, positive: {', '.join(result.positive)})")
        assert outputs.saliencyNodes(ct)  # the scene still holds what the module made


if __name__ == "__main__":
    main()
