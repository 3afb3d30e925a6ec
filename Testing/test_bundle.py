"""Model bundles: round trip as folder and zip, and every refusal names its field."""
import json
import pickle
import shutil
import zipfile

import pytest
import torch
from safetensors.torch import save_file

from fmct.inference.bundle import load_bundle
from fmct.conventions.errors import BundleError
from fmct_testing import tiny_bundle


def _same_outputs(a, b):
    x = torch.rand(1, 3, 32, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(a(x), b(x))


def test_folder_round_trip(tmp_path):
    path, model, meta = tiny_bundle(tmp_path / "b")
    assert sorted(p.name for p in path.iterdir()) == ["fmct.json", "model.safetensors"]
    loaded = load_bundle(path)
    assert loaded.meta.task_names == ["bleed", "fracture"]
    assert loaded.meta.tasks[0].temperature == 1.5
    assert loaded.meta.encoder == meta.encoder and loaded.meta.preprocessing == meta.preprocessing
    assert loaded.meta.provenance["code_version"] and loaded.meta.provenance["created"]
    _same_outputs(model, loaded.model)


def test_zip_round_trip_both_layouts(tmp_path):
    path, model, _ = tiny_bundle(tmp_path / "b.zip")
    _same_outputs(model, load_bundle(path).model)
    folder, _, _ = tiny_bundle(tmp_path / "folder")
    nested = tmp_path / "nested.zip"
    with zipfile.ZipFile(nested, "w") as zf:  # a zip made by zipping the folder keeps it as a prefix
        for f in folder.iterdir():
            zf.write(f, f"folder/{f.name}")
    _same_outputs(load_bundle(folder).model, load_bundle(nested).model)


def _edit_meta(path, fn):
    meta = json.loads((path / "fmct.json").read_text())
    fn(meta)
    (path / "fmct.json").write_text(json.dumps(meta))


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda m: m.update(format_version=99), "format_version"),
        (lambda m: m.update(format="other"), "'format'"),
        (lambda m: m.pop("preprocessing"), "'preprocessing' is missing"),
        (lambda m: m["tasks"][1].update(threshold=1.5), r"tasks\[1\]\.threshold"),
        (lambda m: m["tasks"][0].update(temperature=0), r"tasks\[0\]\.temperature"),
        (lambda m: m["tasks"].append({"name": "bleed"}), "repeats a task name"),
        (lambda m: m["encoder"].update(in_chans=2), "in_chans"),
        (lambda m: m["encoder"].update(family="resnet"), "encoder.family"),
        (lambda m: m["preprocessing"].update(size=[32, 32, 16]), "img_size"),
        (lambda m: m["preprocessing"].update(spacing_mm=[-1, 1, 1]), "spacing_mm"),
        (lambda m: m["encoder"].update(num_heads=5), "num_heads"),
    ],
)
def test_invalid_metadata_is_refused_naming_the_field(tmp_path, edit, message):
    path, _, _ = tiny_bundle(tmp_path / "b")
    _edit_meta(path, edit)
    with pytest.raises(BundleError, match=message):
        load_bundle(path)


def test_weights_that_do_not_fit_the_config_are_refused(tmp_path):
    path, _, _ = tiny_bundle(tmp_path / "b")
    _edit_meta(path, lambda m: m["encoder"].update(embed_dim=64))  # config now wants other shapes
    with pytest.raises(BundleError, match="shape"):
        load_bundle(path)
    path2, _, _ = tiny_bundle(tmp_path / "c")
    _edit_meta(path2, lambda m: m["encoder"].update(depth=3))  # config wants a block that is not there
    with pytest.raises(BundleError, match="missing.*blocks.2"):
        load_bundle(path2)
    path3, _, _ = tiny_bundle(tmp_path / "d", tasks=("a", "b", "c"))
    shutil.copy(path2 / "fmct.json", path3 / "fmct.json")
    _edit_meta(path3, lambda m: m["encoder"].update(depth=2))
    with pytest.raises(BundleError, match="head.fc"):
        load_bundle(path3)


def test_pickle_is_never_loaded(tmp_path):
    path, model, _ = tiny_bundle(tmp_path / "b")
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    (path / "model.safetensors").write_bytes(pickle.dumps({"state": Evil()}))
    with pytest.raises(BundleError, match="not a readable safetensors"):
        load_bundle(path)
    assert not marker.exists()


def test_missing_pieces(tmp_path):
    with pytest.raises(BundleError, match="not found"):
        load_bundle(tmp_path / "nowhere")
    path, model, _ = tiny_bundle(tmp_path / "b")
    (path / "model.safetensors").unlink()
    with pytest.raises(BundleError, match="model.safetensors is missing"):
        load_bundle(path)
    (path / "fmct.json").write_text("{not json")
    with pytest.raises(BundleError, match="not valid JSON"):
        load_bundle(path)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(BundleError, match="no fmct.json"):
        load_bundle(empty)
    extra, model2, _ = tiny_bundle(tmp_path / "x")
    state = {k: v.contiguous() for k, v in model2.state_dict().items()}
    state["surprise"] = torch.zeros(2)
    save_file(state, extra / "model.safetensors")
    with pytest.raises(BundleError, match="unexpected.*surprise"):
        load_bundle(extra)


def test_loading_a_bundle_does_not_import_the_compiler(tmp_path):
    """The weight check builds the model on the meta device; initialising it there would import
    torch._dynamo (1.2 s of every cold start on 2 cores). A fresh process shows what loading pays for."""
    import subprocess
    import sys

    path, _, _ = tiny_bundle(tmp_path / "b")
    code = ("import sys; from fmct.inference.bundle import load_bundle; b = load_bundle(sys.argv[1]); "
            "assert b.model is not None; print('torch._dynamo' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
