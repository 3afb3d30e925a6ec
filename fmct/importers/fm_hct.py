"""`fmct import fm-hct CHECKPOINT --out BUNDLE`: the released FM-HCT encoder as an FMCT bundle.

FM-HCT (Nature Biomedical Engineering 2026; code at NYUMedML/HeadCT-Foundation) releases its encoder as a
PyTorch state dict in the layout of MONAI's ViT. This reads it (a .pth through torch.load(weights_only=True),
tensors only: the one place fmct accepts a pickle-format file, since that is how the weights are released;
or a .safetensors), strips the `module.` / `backbone.` prefixes that wrappers add, checks every key and
shape against the fm-hct preset (refusing with the names of what is missing, unexpected or mis-shaped), and
writes a bundle: model.safetensors in fmct's names, fmct.json with the encoder config and FM-HCT's own
preprocessing (spec crop "foreground", run by MONAI), provenance with the checkpoint's SHA-256, no heads.
The number of blocks is read from the checkpoint (12 in the release), everything else must match.
"""
from __future__ import annotations

import hashlib
import re
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fmct.conventions.errors import BundleError, ConfigError
from fmct.models.config import ViT3DConfig, preset
from fmct.preprocessing.spec import PreprocessSpec, Window

if TYPE_CHECKING:
    import torch

PREFIXES = ("module.", "backbone.")
SOURCE = "FM-HCT encoder (Nature Biomedical Engineering 2026; NYUMedML/HeadCT-Foundation)"
MAX_CHECKPOINT_BYTES = 4 << 30
# FM-HCT's names inside block N -> fmct's (the rest of a key is the same).
_BLOCK_NAMES = {"att_norm": "norm1", "ffn_norm": "norm2", "attn.qkv": "attn.qkv", "attn.proj": "attn.proj",
                "mlp.linear1": "mlp.fc1", "mlp.linear2": "mlp.fc2"}
_TOP_NAMES = {"patch_embedding.patch_embeddings.weight": "patch_embed.proj.weight",
              "patch_embedding.patch_embeddings.bias": "patch_embed.proj.bias",
              "patch_embedding.position_embeddings": "pos_embed", "cls_token": "cls_token",
              "norm.weight": "norm.weight", "norm.bias": "norm.bias"}


def fm_hct_spec() -> PreprocessSpec:
    """FM-HCT's data pipeline as an fmct spec: RAS, 1 mm (cubic spline), crop to > 0 HU, 3 windows, 96^3."""
    return PreprocessSpec(windows=(Window("brain", 40, 80), Window("subdural", 80, 200), Window("bone", 600, 2800)),
                          spacing_mm=(1.0, 1.0, 1.0), size=(96, 96, 96), orientation="RAS", antialias=False,
                          crop="foreground", foreground_hu=0.0, spline_order=3)


def key_map(depth: int) -> dict[str, str]:
    """Every FM-HCT key of an encoder with `depth` blocks -> its fmct name (inside the encoder)."""
    names = dict(_TOP_NAMES)
    for n in range(depth):
        for theirs, ours in _BLOCK_NAMES.items():
            for leaf in ("weight",) if theirs == "attn.qkv" else ("weight", "bias"):  # qkv without bias
                names[f"blocks.{n}.{theirs}.{leaf}"] = f"blocks.{n}.{ours}.{leaf}"
    return names


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """The tensors of a .pth (weights_only) or .safetensors checkpoint, prefixes stripped."""
    import torch

    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: no such checkpoint file; give the path of FM-HCT's model_weights.pth")
    if path.stat().st_size > MAX_CHECKPOINT_BYTES:
        raise ConfigError(f"{path} is {path.stat().st_size >> 20} MiB, far more than an FM-HCT encoder (~340 MiB)")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            state: Any = load_file(str(path))
        except Exception as e:  # safetensors raises its own types for a damaged header
            raise ConfigError(f"{path} is not a readable safetensors file ({e})") from None
    elif path.suffix in (".pth", ".pt", ".bin"):
        try:  # weights_only: tensors and plain containers, never arbitrary objects (see the module docstring)
            state = torch.load(str(path), map_location="cpu", weights_only=True)
        except Exception as e:  # pickle errors, a refused global, a truncated zip
            raise ConfigError(f"{path} is not a tensors-only PyTorch state dict ({type(e).__name__}: "
                              f"{str(e).splitlines()[0][:200]})") from None
    else:
        raise ConfigError(f"{path}: give a .pth or .safetensors checkpoint")
    for wrapper in ("state_dict", "model"):  # a training checkpoint that wraps the state dict
        if isinstance(state, dict) and isinstance(state.get(wrapper), dict):
            state = state[wrapper]
    if not isinstance(state, dict) or not state or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ConfigError(f"{path} does not hold a state dict of tensors (name -> tensor)")
    return {strip_prefixes(str(k)): v for k, v in state.items()}


def strip_prefixes(key: str) -> str:
    """`module.backbone.blocks.0...` -> `blocks.0...` (DataParallel and wrapper prefixes, in any order)."""
    while key.startswith(PREFIXES):
        key = key[len(next(p for p in PREFIXES if key.startswith(p))):]
    return key


def checked_config(state: dict[str, torch.Tensor]) -> ViT3DConfig:
    """The fm-hct config with the checkpoint's number of blocks; refuses any missing, extra or mis-shaped key."""
    import torch

    from fmct.models.vit3d import ViT3D

    indices = {int(m.group(1)) for k in state if (m := re.match(r"blocks\.(\d+)\.", k))}
    depth = max(indices) + 1 if indices else 0
    if depth < 1:
        raise BundleError("the checkpoint has no transformer blocks ('blocks.N.*'); is it FM-HCT's encoder?")
    cfg = replace(preset("fm-hct"), depth=depth)
    names = key_map(depth)
    missing, extra = sorted(set(names) - set(state)), sorted(set(state) - set(names))
    if missing or extra:
        raise BundleError(f"the checkpoint does not have FM-HCT's encoder layout: missing {missing[:6]}"
                          f"{'...' if len(missing) > 6 else ''} ({len(missing)}), unexpected {extra[:6]}"
                          f"{'...' if len(extra) > 6 else ''} ({len(extra)})")
    with torch.device("meta"):
        expected = {k: tuple(v.shape) for k, v in ViT3D(cfg).state_dict().items()}
    wrong = [f"{k} {list(state[k].shape)} (needs {list(expected[v])})" for k, v in names.items()
             if tuple(state[k].shape) != expected[v]]
    if wrong:
        raise BundleError(f"the checkpoint's tensors do not have FM-HCT's shapes: {'; '.join(wrong[:4])}")
    bad = [k for k in names if not state[k].is_floating_point() or not bool(torch.isfinite(state[k]).all())]
    if bad:
        raise BundleError(f"the checkpoint holds non-float or non-finite values in {bad[:4]}; the file is damaged")
    return cfg


def import_fm_hct(checkpoint: str | Path, out: str | Path, name: str = "fm-hct") -> Path:
    """Write an encoder-only FMCT bundle from FM-HCT's checkpoint; returns the bundle path."""
    import torch

    from fmct.inference.bundle import BundleMeta, save_bundle
    from fmct.models import FMCTClassifier

    checkpoint = Path(checkpoint)
    state = read_state_dict(checkpoint)
    cfg = checked_config(state)
    model = FMCTClassifier(cfg, 0)
    ours = {f"encoder.{v}": state[k].to(torch.float32) for k, v in key_map(cfg.depth).items()}
    ours["encoder.mask_token"] = torch.zeros_like(model.encoder.mask_token)  # fmct's masked modeling only; unused
    model.load_state_dict(ours, strict=True)
    digest = hashlib.sha256()
    with checkpoint.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    meta = BundleMeta(
        name=name, encoder=cfg, preprocessing=fm_hct_spec(), tasks=[],
        description=f"{SOURCE}, imported by `fmct import fm-hct`. Features: the CLS token after the final norm.",
        provenance={"source": SOURCE, "imported_from": checkpoint.name, "checkpoint_sha256": digest.hexdigest(),
                    "checkpoint_bytes": checkpoint.stat().st_size, "blocks": cfg.depth,
                    "licence": "the authors' licence of the released weights applies (see their repository)",
                    "citation": "FM-HCT: a foundation model for head CT, Nature Biomedical Engineering (2026)"},
    )
    return save_bundle(model, meta, out)
