"""Training data as tensors: a dataset over a manifest that caches preprocessed volumes.

`CachedVolumeDataset` turns a manifest (`fmct.data.manifests`) into tensors. Decoding DICOM and
resampling dominates the cost of an epoch, so each study is preprocessed once and stored as a .npy
file keyed by the source files and the preprocessing spec; later epochs (and later runs) only read
.npy files. A study that cannot be read is skipped, counted and logged by path, never stopping the
run.
"""
from __future__ import annotations

import hashlib
import io
import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from fmct.conventions.atomic import write_bytes_atomic
from fmct.conventions.errors import Cancelled, ConfigError
from fmct.data.manifests import Manifest, Study
from fmct.data.sources import read_study, source_files  # noqa: F401  (their home is torch-free; re-exported here)
from fmct.preprocessing.preprocessor import Preprocessor, PreprocessSpec
from fmct.conventions.runtime import CancelCheck, Progress

log = logging.getLogger("fmct.data.datasets")


CACHE_VERSION = 1


@dataclass
class SkippedStudy:
    """A study left out of training, and why. Holds paths and error messages, never patient data."""

    study_id: str
    path: str
    reason: str


def cache_key(study: Study, spec: PreprocessSpec, cache_dtype: str = "float16") -> str:
    """sha256 of where the study is, its files' names, sizes and mtimes, and the preprocessing spec.

    Stat data instead of content: hashing every byte of every study would cost about as much as
    decoding it. The absolute path is included because studies of public datasets often have
    identical relative file names and sizes. Any change of a file or of the spec gives a new key.
    """
    digest = hashlib.sha256()
    head = {"version": CACHE_VERSION, "spec": spec.to_dict(), "dtype": cache_dtype,
            "series_uid": study.series_uid, "path": str(study.path.resolve())}
    digest.update(json.dumps(head, sort_keys=True).encode())
    for f in source_files(study):
        st = f.stat()
        digest.update(f"\n{f.resolve()}\0{st.st_size}\0{st.st_mtime_ns}".encode())
    return digest.hexdigest()[:40]


def save_npy_atomic(path: Path, array: np.ndarray) -> None:
    """Write a .npy so that readers see either nothing or the complete file."""
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(array), allow_pickle=False)
    write_bytes_atomic(path, buf.getvalue())


try:
    from torch.utils.data import Dataset as _TorchDataset
except ImportError:  # pragma: no cover - torch is a dependency; kept so `import fmct.data.datasets` works without it
    _TorchDataset = object


class CachedVolumeDataset(_TorchDataset):
    """Studies as dict(image=[C,D,H,W] float32 tensor, labels=[T] float32 with NaN = unknown, study_id).

    `prepare()` (called by the first len() or item access if not called before) preprocesses
    every study that is not cached yet, and builds the index of the studies that worked; items
    are then only .npy reads, so later epochs never decode DICOM. Unreadable studies are in
    `skipped`; `stats` counts cache hits and decoded studies.

    MONAI's PersistentDataset was considered and not used: it stores its cache with torch.save,
    i.e. pickle, and loading pickles from a shared cache folder can run arbitrary code. Here the
    cache holds plain .npy arrays, loaded with allow_pickle=False.
    """

    def __init__(self, manifest: Sequence[Study], spec: PreprocessSpec, cache_dir: str | Path,
                 transform: Callable[[dict], dict] | None = None, tasks: Sequence[str] | None = None,
                 cache_dtype: str = "float16", augment: float = 0.0, augment_seed: int = 0) -> None:
        if cache_dtype not in ("float16", "float32"):
            raise ConfigError(f"cache_dtype must be 'float16' or 'float32', got {cache_dtype!r}")
        if not 0.0 <= augment <= 1.0:
            raise ConfigError(f"augment must be a probability between 0 and 1, got {augment}")
        self.augment = float(augment)       # share of items rescanned at random (fmct.data.rescan) before preprocessing
        self.augment_seed = int(augment_seed)
        self.epoch = 0
        self.manifest = list(manifest)
        self.spec = spec
        self.cache_dir = Path(cache_dir)
        self.transform = transform
        self.tasks = list(tasks) if tasks is not None else Manifest(self.manifest).tasks
        self.cache_dtype = cache_dtype
        self.preprocessor = Preprocessor(spec)
        self.skipped: list[SkippedStudy] = []
        self.stats = {"hits": 0, "decoded": 0}
        self._index: list[tuple[Study, Path]] | None = None

    # ---- preparing the cache ----

    def prepare(self, progress: Progress | None = None, cancel: CancelCheck | None = None) -> "CachedVolumeDataset":
        """Make sure every readable study is cached; skip (log, count) the others."""
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        index, self.skipped = [], []
        n = len(self.manifest)
        for i, study in enumerate(self.manifest):
            if cancel is not None and cancel():
                raise Cancelled("Preparing the training data was cancelled.")
            path = self._prepare_one(study)
            if path is not None:
                index.append((study, path))
            if progress is not None:
                progress((i + 1) / max(n, 1), f"study {i + 1}/{n}")
        self._index = index
        if self.skipped:
            log.warning("%d of %d studies skipped as unreadable (listed above).", len(self.skipped), n)
        return self

    def _prepare_one(self, study: Study) -> Path | None:
        """The study's cache file, made if needed; None (skipped, logged) when the study cannot be read.
        A failed write (a full disk) is not the study's fault: it stops the run (CacheWriteError)."""
        try:
            path = self.cache_dir / f"{cache_key(study, self.spec, self.cache_dtype)}.npy"
            if self._is_cached(path):
                self.stats["hits"] += 1
                return path
            array = self.preprocess(study).astype(self.cache_dtype)
        except Exception as error:  # noqa: BLE001 - one bad study must never stop a training run
            self._skip(study, error)
            return None
        try:
            save_npy_atomic(path, array)
        except OSError as e:
            from fmct.data.cache import CacheWriteError

            raise CacheWriteError(f"cannot write the training cache {self.cache_dir} ({e.strerror or e}); free space or "
                                  "choose another cache folder, then run again") from e
        self.stats["decoded"] += 1
        return path

    def preprocess(self, study: Study) -> np.ndarray:
        """Read and preprocess one study: [C, D, H, W] float32 on the model grid."""
        return self.preprocessor(read_study(study)).array[0]

    def _is_cached(self, path: Path) -> bool:
        """A cache file counts only if its header says the expected shape (a torn file would not)."""
        if not path.is_file():
            return False
        try:
            array = np.load(path, mmap_mode="r", allow_pickle=False)
        except (OSError, ValueError):
            return False
        return array.shape == (self.spec.in_channels, *self.spec.tensor_shape) and array.dtype == self.cache_dtype

    def _skip(self, study: Study, error: BaseException) -> None:
        reason = f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"
        log.warning("Skipping unreadable study %s (%s): %s", study.study_id, study.path, reason)
        self.skipped.append(SkippedStudy(study.study_id, str(study.path), reason))

    # ---- Dataset protocol ----

    @property
    def index(self) -> list[tuple[Study, Path]]:
        if self._index is None:
            self.prepare()
        return self._index

    @property
    def studies(self) -> list[Study]:
        """The studies that are in the dataset (readable ones), in item order."""
        return [s for s, _ in self.index]

    def __len__(self) -> int:
        return len(self.index)

    def set_epoch(self, epoch: int) -> None:
        """The epoch the next items belong to: with `augment`, item i of epoch e is always the same rescan."""
        self.epoch = int(epoch)

    def augmented(self, i: int) -> np.ndarray | None:
        """Item i's CT rescanned with a random variation, preprocessed; None if this (seed, epoch, i) draws none.

        The generator is seeded by (augment_seed, epoch, i), so a resumed or repeated run sees the
        same rescans. It re-reads the study (the cache holds preprocessed tensors): the price of
        varying the CT itself rather than the tensor.
        """
        from fmct.data.rescan import random_variation

        rng = np.random.default_rng([self.augment_seed, self.epoch, i])
        if rng.random() >= self.augment:
            return None
        volume, _ = random_variation(read_study(self.index[i][0]), rng)
        return self.preprocessor(volume).array[0].astype(self.cache_dtype)

    def __getitem__(self, i: int) -> dict[str, Any] | None:
        """One study; None if its cache file vanished and it cannot be rebuilt (see `collate_skip_none`)."""
        import torch

        study, path = self.index[i]
        array = None
        if self.augment > 0.0:
            try:
                array = self.augmented(i)
            except Exception as error:  # noqa: BLE001 - a study that read once but not now: use its cached tensor
                log.warning("Augmenting %s failed (%s); using it as cached.", study.study_id, error)
        try:
            if array is None:
                array = np.load(path, allow_pickle=False)
        except (OSError, ValueError):
            rebuilt = self._prepare_one(study)
            if rebuilt is None:
                return None
            array = np.load(rebuilt, allow_pickle=False)
        sample = {
            "image": torch.from_numpy(array.astype(np.float32)),
            "labels": torch.tensor(self.label_vector(study), dtype=torch.float32),
            "study_id": study.study_id,
        }
        return self.transform(sample) if self.transform is not None else sample

    def label_vector(self, study: Study) -> list[float]:
        """Labels in `self.tasks` order, NaN where unknown (losses mask these out)."""
        values = (study.labels.get(t) for t in self.tasks)
        return [math.nan if v is None else float(v) for v in values]


def collate_skip_none(batch: list[dict | None]) -> dict | None:
    """DataLoader collate that drops the items a dataset could not produce (None)."""
    from torch.utils.data import default_collate

    batch = [b for b in batch if b is not None]
    return default_collate(batch) if batch else None
