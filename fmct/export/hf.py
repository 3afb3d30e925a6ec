"""`fmct export BUNDLE --hf`: a Hugging Face-style model folder (config.json, model.safetensors, README.md).

config.json holds the bundle's whole fmct.json under "fmct" (encoder config, preprocessing, tasks), so
`fmct.features.embed.load_encoder` reads the folder back with the same checks as a bundle; the weights are
the bundle's own safetensors, byte for byte. README.md is a model card written from fmct.json: intended
use, training data, metrics, limitations, licence and citation (what provenance says, never invented).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from fmct.conventions.atomic import write_bytes_atomic, write_text_atomic
from fmct.conventions.errors import BundleError

MODEL_TYPE = "fmct-vit3d"


def export_hf(bundle_path: str | Path, out: str | Path) -> Path:
    """Write config.json, model.safetensors and README.md into the folder `out`; returns it."""
    from fmct.inference.bundle import WEIGHTS_FILE, read_bundle

    meta, members = read_bundle(bundle_path)
    d = meta.to_dict()
    config = {"model_type": MODEL_TYPE, "architectures": ["ViT3D"], "hidden_size": meta.encoder.embed_dim,
              "num_hidden_layers": meta.encoder.depth, "num_attention_heads": meta.encoder.num_heads,
              "image_size": list(meta.encoder.img_size), "patch_size": list(meta.encoder.patch_size),
              "num_channels": meta.encoder.in_chans, "fmct": d}
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    write_bytes_atomic(out / "model.safetensors", members[WEIGHTS_FILE])
    write_text_atomic(out / "README.md", model_card(d))
    write_text_atomic(out / "config.json", json.dumps(config, indent=2))  # last: a folder with it is complete
    return out


def read_hf_meta(folder: Path) -> Any:
    """The BundleMeta in an exported folder's config.json (refusing a config.json of another model)."""
    from fmct.inference.bundle import BundleMeta

    try:
        config = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError) as e:
        raise BundleError(f"{folder}/config.json is not readable JSON ({e})") from None
    if not isinstance(config, dict) or config.get("model_type") != MODEL_TYPE or "fmct" not in config:
        raise BundleError(f"{folder}/config.json is not an fmct export (model_type {config.get('model_type')!r}); "
                          "give an fmct bundle or a folder written by `fmct export --hf`")
    return BundleMeta.from_dict(config["fmct"])


def model_card(d: dict[str, Any]) -> str:
    """A model card from fmct.json; sections say 'not recorded' where the bundle does not say."""
    prov, enc, prep = d.get("provenance") or {}, d["encoder"], d["preprocessing"]
    tasks = [t["name"] for t in d.get("tasks") or []]
    windows = ", ".join(f"{w['name']} {w['center']:g}/{w['width']:g}" for w in prep["windows"])
    metrics = json.dumps(d.get("metrics"), indent=2) if d.get("metrics") else "not recorded in this bundle"
    lines = [
        f"# {d['name']}", "", d.get("description") or "", "",
        "## Intended use", "",
        "Research on non-contrast head CT: " + (f"findings {', '.join(tasks)}." if tasks else
                                                "feature extraction (an encoder without task heads)."),
        "Not a medical device; not for clinical decisions.", "",
        "## Model", "",
        f"3D ViT: {enc['embed_dim']} wide, {enc['depth']} blocks, {enc['num_heads']} heads, input {enc['in_chans']} x "
        f"{' x '.join(map(str, enc['img_size']))}, patch {' x '.join(map(str, enc['patch_size']))}.",
        f"Preprocessing: orientation {prep.get('orientation', 'LPS')}, spacing {prep['spacing_mm']} mm, crop "
        f"'{prep.get('crop', 'head')}', windows {windows}, size {prep['size']}. Load with "
        "`fmct.features.embed.load_encoder(folder)`.", "",
        "## Training data", "", str(prov.get("training_data") or prov.get("source") or "not recorded in this bundle"), "",
        "## Metrics", "", "```", metrics, "```", "",
        "## Limitations", "",
        str(prov.get("limitations") or "Validated only as recorded above; performance on other scanners, populations "
            "and protocols is unknown until measured."), "",
        "## Licence", "", str(prov.get("licence") or "not recorded in this bundle"), "",
        "## Citation", "", str(prov.get("citation") or "not recorded in this bundle"), "",
        "## Provenance", "", "```", json.dumps(prov, indent=2), "```", "",
    ]
    return "\n".join(lines)
