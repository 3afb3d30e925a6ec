"""Pretraining's data: the volumes (tensors, phantoms, a prepared cache or CTs prepared at start) and
StepBatches, which makes step -> batch a pure function of the step and seed (what exact resume rests on).

Split from fmct.train.pretrain (which re-exports these names) so each module has one job.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any, Protocol, Sequence

import torch

from fmct.conventions.errors import ConfigError
from fmct.ssl.augment import MultiCropAugmentation, collate_crops, sample_generator
from fmct.ssl.batched_crops import BatchedMultiCrop
from fmct.ssl.config import SSLConfig
from fmct.ssl.masking import sample_masks
from fmct.train import distributed as ddp

log = logging.getLogger("fmct.train.pretrain")


class VolumeDataset(Protocol):
    """What the loop needs from a dataset: preprocessed model-grid volumes by index.

    __getitem__ returns a [C, D, H, W] tensor, or a mapping with that tensor under "image"
    (so fmct.data.datasets's datasets plug in unchanged).
    """

    def __len__(self) -> int: ...

    def __getitem__(self, index: int) -> Any: ...


class TensorVolumes:
    """An in-memory dataset of preprocessed volumes x [N, C, D, H, W] (e.g. half precision)."""

    def __init__(self, x: torch.Tensor) -> None:
        if x.ndim != 5:
            raise ConfigError(f"pretraining tensors must be [N, C, D, H, W], got shape {list(x.shape)}")
        self.x = x

    def __len__(self) -> int:
        return self.x.shape[0]

    def __getitem__(self, index: int) -> torch.Tensor:
        return self.x[index]


def make_phantom_tensors(n: int, seed: int, spacing_mm: Sequence[float], size: Sequence[int], in_plane_size: int = 128,
                         anatomy: str = "default") -> torch.Tensor:
    """n synthetic head CTs preprocessed to the model grid: [n, 3, D, H, W] float16.

    anatomy: a preset name, or several comma-separated, taken in turn (more varied data)."""
    from fmct.phantom import make_phantom
    from fmct.preprocessing.preprocessor import Preprocessor, PreprocessSpec

    pre = Preprocessor(PreprocessSpec(spacing_mm=tuple(float(v) for v in spacing_mm), size=tuple(int(v) for v in size)))
    slices, presets = ("thick", "thin"), [a.strip() for a in anatomy.split(",") if a.strip()] or ["default"]
    xs = [pre(make_phantom(seed + i, slices=slices[i % 2], in_plane_size=in_plane_size,
                           anatomy=presets[(i // 2) % len(presets)]).volume).tensor[0].half() for i in range(n)]
    return torch.stack(xs)


def preprocess_spec(cfg: SSLConfig) -> Any:
    """The one PreprocessSpec of a run: what its data goes through and what its bundle records."""
    from fmct.preprocessing.spec import PreprocessSpec

    return PreprocessSpec(spacing_mm=tuple(cfg.data.spacing_mm), size=tuple(cfg.data.size))


def load_dataset(cfg: SSLConfig, info: ddp.DistInfo | None = None) -> Any:
    """The run's volumes. A prepared cache is read through its index (no source file touched, unless
    data.verify); a folder or manifest is first prepared into such a cache under data.cache_dir, each
    torchrun rank doing its own share of the studies (fmct.data.prepare), then read the same way, so
    training from the sources and from `fmct prepare`'s cache see the same tensors."""
    d, info = cfg.data, info or ddp.DistInfo()
    if d.source in ("manifest", "prepared"):
        from fmct.data.cache import PreparedVolumes, open_for

        spec = preprocess_spec(cfg)
        path = _prepare_sources(cfg, info) if d.source == "manifest" else Path(d.path)
        return PreparedVolumes(open_for(path, spec, verify=d.verify), spec.windows)
    if d.source == "tensors":
        from safetensors.torch import load_file

        path = Path(d.path)
        if not path.is_file():
            raise ConfigError(f"data.path {path} does not exist; give a safetensors file with tensor 'x' [N, C, D, H, W]")
        tensors = load_file(str(path))
        if "x" not in tensors:
            raise ConfigError(f"data.path {path} has no tensor 'x' (it has {sorted(tensors)})")
        return TensorVolumes(tensors["x"])
    return TensorVolumes(make_phantom_tensors(d.n, d.seed, d.spacing_mm, d.size, d.in_plane_size, d.anatomy))


def _prepare_sources(cfg: SSLConfig, info: ddp.DistInfo) -> Path:
    """Prepare data.path into data.cache_dir/prepared-<digest> (this rank's share, then wait for the others)."""
    from fmct.data.cache import grid_record
    from fmct.data.manifests import load_manifest
    from fmct.data.prepare import manifest_digest, prepare

    spec, studies = preprocess_spec(cfg), load_manifest(cfg.data.path)
    key = hashlib.sha256(json.dumps([manifest_digest(studies), grid_record(spec)]).encode()).hexdigest()[:16]
    root = Path(cfg.data.cache_dir) / f"prepared-{key}"
    result = prepare(studies, spec, root, workers=1, rank=info.rank, world=info.world_size)
    log.info("prepared %d studies (%d unit(s) done before) into %s", result.studies_written, len(result.units_skipped), root)
    ddp.barrier()
    return root


def _image(item: Any) -> torch.Tensor:
    return item["image"] if isinstance(item, dict) else item


class _Steps(torch.utils.data.Dataset):
    """Steps start..total-1 as a map-style dataset, so DataLoader workers make batches ahead of the model.

    Item i is StepBatches(start + i): a pure function of the step and seed, so what a worker makes
    is what the training process would have made, and resume stays exact.
    """

    def __init__(self, batches: "StepBatches", start: int, total: int) -> None:
        self.batches, self.start, self.total = batches, start, total

    def __len__(self) -> int:
        return max(self.total - self.start, 0)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return self.batches(self.start + i)


def resolve_workers(workers: int, device: torch.device) -> int:
    """run.workers, with -1 (auto) meaning min(8, CPUs - 1) beside an accelerator and 0 on a CPU
    (there the model and the crops share the same cores; benchmarks/RESULTS.md#pretrain-step)."""
    if workers >= 0:
        return workers
    return min(8, max((os.cpu_count() or 1) - 1, 0)) if device.type != "cpu" else 0


def step_batches(batches: "StepBatches", start: int, total: int, workers: int, pin: bool = False):
    """An iterator over the batches of steps start..total-1, in order (in this process or in workers)."""
    if workers <= 0:
        return (batches(step) for step in range(start, total))
    import multiprocessing

    loader = torch.utils.data.DataLoader(
        _Steps(batches, start, total), batch_size=None, shuffle=False, num_workers=workers, pin_memory=pin,
        prefetch_factor=2, multiprocessing_context=multiprocessing.get_context("spawn"))  # no fork after torch's threads
    return iter(loader)


class StepBatches:
    """Step -> (epoch, position, crops + masks of this rank's batch), a pure function of the step."""

    def __init__(self, dataset: VolumeDataset, cfg: SSLConfig, info: ddp.DistInfo, on_device: bool = False) -> None:
        self.dataset, self.cfg, self.info = dataset, cfg, info
        self.sampler = ddp.distributed_sampler(dataset, info, cfg.run.seed)
        self.batch_size = cfg.optim.batch_size
        self.steps_per_epoch = len(self.sampler) // self.batch_size
        if self.steps_per_epoch < 1:
            raise ConfigError(
                f"the dataset has {len(dataset)} volumes, too few for batch_size {self.batch_size} on {info.world_size} process(es)")
        self.augment = MultiCropAugmentation(cfg.crops)
        self.on_device = on_device  # crops made later by device_crops, on the training device
        self.grid = tuple(s // p for s, p in zip(cfg.crops.global_size, cfg.encoder_config.patch_size))
        self._order: tuple[int, list[int]] | None = None

    def position(self, step: int) -> tuple[int, int]:
        return divmod(step, self.steps_per_epoch)

    def indices(self, epoch: int, position: int) -> list[int]:
        if self._order is None or self._order[0] != epoch:
            self.sampler.set_epoch(epoch)
            self._order = (epoch, list(self.sampler))
        return self._order[1][position * self.batch_size:(position + 1) * self.batch_size]

    def volume(self, i: int) -> torch.Tensor:
        """Item i as the loader hands it to the device: int16 HU where the dataset has it, else its channels."""
        hu = getattr(self.dataset, "hu", None)
        return hu(i) if hu is not None else _image(self.dataset[i])

    def __call__(self, step: int) -> dict[str, torch.Tensor]:
        epoch, position = self.position(step)
        seed = self.cfg.run.seed
        n_local = self.cfg.crops.n_local if step >= self.cfg.crops.local_start_step else 0
        indices = self.indices(epoch, position)
        if self.on_device:  # the volumes and the keys of their random streams; device_crops makes the views
            batch = {"volumes": torch.stack([self.volume(i) for i in indices]),
                     "keys": torch.tensor([[seed, epoch, i] for i in indices]), "n_local": torch.tensor(n_local),
                     "noise_key": torch.tensor([seed, step, self.info.rank])}
        else:
            batch = collate_crops([self.augment(_image(self.dataset[i]), sample_generator(seed, epoch, i), n_local)
                                   for i in indices])
        ib = self.cfg.ibot
        prob = ib.mask_probability if (ib.enabled or self.cfg.mae.enabled) else 0.0
        batch["masks"] = sample_masks(2 * len(indices), self.grid, ib.mask_ratio, prob,
                                      sample_generator(seed, step, self.info.rank, 0x6D61736B))
        return batch


def device_crops(crop: BatchedMultiCrop, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A StepBatches batch made with on_device (already on the device) -> the crops and masks the model takes."""
    views = crop(batch["volumes"], batch["keys"].tolist(), int(batch["n_local"]), batch["noise_key"].tolist())
    return {**views, "masks": batch["masks"]}


def view_calibration(dataset: VolumeDataset, cfg: SSLConfig, n: int = 16) -> dict[str, float]:
    """Are two global views of one CT more alike than views of two CTs? Measured on the run's data.

    pixel_view_ratio = rms(view 1, view 2 of one CT) / rms(view 1 of CT i, view 2 of CT j), over
    the first n volumes, with the run's own augmentation (seeded apart from the run's crops). Below
    1 the augmentations keep what tells CTs apart; at ~1 self-distillation cannot learn
    (benchmarks/HISTORY.md#history-15).
    """
    from fmct.ssl.metrics import pixel_view_ratio

    augment, count = MultiCropAugmentation(cfg.crops), min(n, len(dataset))
    views = [augment(_image(dataset[i]), sample_generator(cfg.run.seed, 0x76696577, i), 0)["global"] for i in range(count)]
    a, b = torch.stack([v[0] for v in views]), torch.stack([v[1] for v in views])
    return {"pixel_view_ratio": float(pixel_view_ratio(a, b)), "volumes": count}
