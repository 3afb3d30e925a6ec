"""The prepared training cache: each study decoded and resampled once, stored as int16 HU in shards.

Layout of a cache folder (written by `fmct prepare`, fmct.data.prepare)::

    CACHE/cache.json              format, version, the model grid (spacing, size, orientation,
                                  antialias), the study list's digest, the unit size
    CACHE/shards/unit-00012.bin   the HU volumes of work unit 12, int16 little-endian, back to back
    CACHE/shards/unit-00012.json  its index: per study id, source path, labels, byte offset, shape,
                                  sha256 of the bytes, a digest of the source files' names/sizes/mtimes
    CACHE/errors.jsonl            the studies that could not be read, one JSON line each with the reason

One channel of HU instead of three float16 windows: 2 bytes a voxel instead of 6, and the windows
are applied when the batch is made (`windows_to_channels`), so one cache serves any choice of
windows. A unit's .bin is written before its .json, both atomically, so a unit counts as done
exactly when its index exists; readers never see half a unit. Shards instead of one file per
study: 361k studies are ~1,400 files, not 361k, and reading the index never touches the sources
(`verify_sources` does, on request).
"""
from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np

from fmct.conventions.errors import ConfigError, FMCTError
from fmct.preprocessing.preprocessor import AIR_HU, PreprocessSpec, Window

FORMAT = "fmct-prepared-cache"
VERSION = 1
CACHE_JSON = "cache.json"
SHARDS = "shards"
ERRORS = "errors.jsonl"
HU_DTYPE = np.dtype("<i2")
GRID_FIELDS = ("spacing_mm", "size", "orientation", "antialias")  # what the stored HU depends on (not the windows)


class CacheMismatchError(ConfigError):
    """A prepared cache made with other preprocessing, or from another study list, than asked for."""


class CacheWriteError(FMCTError):
    """Writing the cache failed (a full disk, a lost mount): the step stops rather than drop studies."""


def grid_record(spec: PreprocessSpec) -> dict[str, Any]:
    """The part of a PreprocessSpec the stored HU depends on, as JSON values."""
    d = spec.to_dict()
    return {k: (list(d[k]) if isinstance(d[k], tuple) else d[k]) for k in GRID_FIELDS} | {"hu_floor": AIR_HU,
                                                                                          "dtype": "int16"}


def grid_differences(stored: dict[str, Any], wanted: dict[str, Any]) -> list[str]:
    """'field: cache X, wanted Y' for each grid field that differs."""
    return [f"{k}: cache {stored.get(k)!r}, wanted {wanted.get(k)!r}" for k in sorted(set(stored) | set(wanted))
            if json.dumps(stored.get(k)) != json.dumps(wanted.get(k))]


def hu_to_int16(hu: np.ndarray) -> np.ndarray:
    """HU (float, on the model grid) rounded to whole HU as little-endian int16: +-0.5 HU, below CT noise."""
    info = np.iinfo(np.int16)
    return np.clip(np.rint(hu), info.min, info.max).astype(HU_DTYPE)


def windows_to_channels(hu: Any, windows: Sequence[Window]) -> Any:
    """[..., D, H, W] HU (torch tensor, any device) -> [..., C, D, H, W] float32 in [0, 1], one channel a
    window: the same formula as Window.apply, on the device the batch is made on."""
    x = hu.float().unsqueeze(-4)
    low = x.new_tensor([w.center - w.width / 2.0 for w in windows]).view(-1, 1, 1, 1)
    width = x.new_tensor([w.width for w in windows]).view(-1, 1, 1, 1)
    return ((x - low) / width).clamp(0.0, 1.0)


def source_digest(files: Iterable[Path]) -> str:
    """sha256 over the source files' resolved names, sizes and mtimes (what `verify_sources` compares)."""
    h = hashlib.sha256()
    for f in files:
        st = f.stat()
        h.update(f"{f.resolve()}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:32]


def unit_name(unit: int) -> str:
    return f"unit-{unit:05d}"


@dataclass
class CacheEntry:
    """One stored study: where its bytes are and where it came from (paths and ids, never patient data)."""

    study_id: str
    path: str
    labels: dict[str, int | None]
    unit: int
    offset: int
    shape: tuple[int, int, int]
    sha256: str
    source: str
    series_uid: str | None = None
    files: list[str] | None = None

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape)) * HU_DTYPE.itemsize


@dataclass
class PreparedCache:
    """A prepared cache opened through its index: no source file is touched."""

    root: Path
    meta: dict[str, Any]
    entries: list[CacheEntry] = field(default_factory=list)
    units_done: set[int] = field(default_factory=set)

    @classmethod
    def open(cls, root: str | Path) -> "PreparedCache":
        root = Path(root)
        meta_path = root / CACHE_JSON
        try:
            meta = json.loads(meta_path.read_text())
        except FileNotFoundError:
            raise ConfigError(f"{root} is not a prepared cache (no {CACHE_JSON}); make one with `fmct prepare DATA --out "
                              f"{root}`") from None
        except (OSError, ValueError) as e:
            raise ConfigError(f"{meta_path} is unreadable ({e}); prepare the cache again into a new --out") from e
        if meta.get("format") != FORMAT or meta.get("version") != VERSION:
            raise ConfigError(f"{root} is a {meta.get('format')} v{meta.get('version')} cache; this fmct reads "
                              f"{FORMAT} v{VERSION}: prepare it again with this version")
        cache = cls(root, meta)
        for index in sorted((root / SHARDS).glob("unit-*.json")):
            unit = json.loads(index.read_text())
            cache.units_done.add(int(unit["unit"]))
            for e in unit["studies"]:
                cache.entries.append(CacheEntry(**{**e, "shape": tuple(e["shape"]), "unit": int(unit["unit"])}))
        return cache

    @property
    def complete(self) -> bool:
        return len(self.units_done) == int(self.meta["units"])

    def check_grid(self, spec: PreprocessSpec) -> None:
        """Refuse a cache whose HU grid is not the one asked for, naming each difference."""
        diff = grid_differences(self.meta["grid"], grid_record(spec))
        if diff:
            raise CacheMismatchError(f"the prepared cache {self.root} was made with other preprocessing ({'; '.join(diff)}); "
                                     "prepare the data again with these settings into another --out")

    def unit_file(self, unit: int) -> Path:
        return self.root / SHARDS / f"{unit_name(unit)}.bin"

    def read_hu(self, i: int) -> np.ndarray:
        """Study i's HU volume, int16 [D, H, W] (one read of its bytes)."""
        e = self.entries[i]
        with open(self.unit_file(e.unit), "rb") as f:
            f.seek(e.offset)
            data = f.read(e.nbytes)
        if len(data) != e.nbytes:
            raise ConfigError(f"{self.unit_file(e.unit)} is shorter than its index says (study {e.study_id}); "
                              "delete that unit's .json and run `fmct prepare` again")
        return np.frombuffer(data, dtype=HU_DTYPE).reshape(e.shape)

    def verify(self) -> list[str]:
        """Problems found by checking every study's bytes (sha256) and its source files (names,
        sizes, mtimes): empty when the cache is sound and up to date. Stats every source: slow on
        a large archive, hence only on request (`--verify`)."""
        from fmct.data.sources import source_files

        problems = []
        for i, e in enumerate(self.entries):
            if hashlib.sha256(self.read_hu(i).tobytes()).hexdigest() != e.sha256:
                problems.append(f"{e.study_id}: stored bytes do not match their sha256")
            try:
                now = source_digest(source_files(as_study(e)))
            except (OSError, FMCTError) as err:
                problems.append(f"{e.study_id}: source {e.path} unreadable ({err})")
                continue
            if now != e.source:
                problems.append(f"{e.study_id}: source {e.path} changed since it was prepared")
        return problems


def as_study(e: CacheEntry):
    """The manifest Study an entry was prepared from (for labels, ids, and --verify)."""
    from fmct.data.manifests import Study

    return Study(e.study_id, Path(e.path), dict(e.labels), e.series_uid,
                 tuple(Path(f) for f in e.files) if e.files is not None else None)


def is_prepared_cache(path: str | Path) -> bool:
    """Whether a data argument names a prepared cache (a folder with cache.json) rather than CTs."""
    return (Path(path) / CACHE_JSON).is_file()


def open_for(path: "str | Path | PreparedCache", spec: PreprocessSpec, verify: bool = False) -> PreparedCache:
    """Open a cache (or take an opened one) for training or embedding with spec: refuse another grid or
    an unfinished cache; with verify, refuse a cache whose bytes or sources changed."""
    cache = path if isinstance(path, PreparedCache) else PreparedCache.open(path)
    cache.check_grid(spec)
    if not cache.complete:
        raise ConfigError(f"the prepared cache {cache.root} is unfinished ({len(cache.units_done)} of "
                          f"{cache.meta['units']} units); run `fmct prepare` again to finish it")
    if not cache.entries:
        raise ConfigError(f"the prepared cache {cache.root} holds no readable study (see {cache.root / ERRORS})")
    if verify:
        problems = cache.verify()
        if problems:
            raise CacheMismatchError(f"--verify: {len(problems)} problem(s) in {cache.root}, e.g. {problems[0]}; "
                                     "prepare the data again into a new --out")
    return cache


def load_studies(data: str | Path, layout: str = "auto", path_prefix: str | None = None) -> tuple[Any, PreparedCache | None]:
    """(manifest, cache): a prepared cache's studies read from its index (no source touched), with the
    cache; or the manifest of a folder / CSV / RSNA / CQ500 layout / FM-HCT split file, with None."""
    from fmct.data.manifests import Manifest, load_manifest

    if is_prepared_cache(data):
        cache = PreparedCache.open(data)
        return Manifest([as_study(e) for e in cache.entries]), cache
    return load_manifest(data, layout, path_prefix=path_prefix), None


class PreparedVolumes:
    """A map-style dataset over a prepared cache as training items: dict(image=[C, D, H, W] float32 windows,
    labels [T] with NaN = unknown, study_id), like fmct.data.datasets.CachedVolumeDataset's; or with hu_only
    the int16 HU tensor [D, H, W] alone (windows applied later, e.g. on the GPU). study_ids: a subset, in
    that order. torch's DataLoader and samplers take it, yet this module imports no torch, so `fmct
    prepare`'s workers start without it."""

    def __init__(self, cache: PreparedCache, windows: Sequence[Window], tasks: Sequence[str] | None = None,
                 hu_only: bool = False, study_ids: Sequence[str] | None = None) -> None:
        self.cache, self.windows, self.hu_only = cache, tuple(windows), hu_only
        where = {e.study_id: i for i, e in enumerate(cache.entries)}
        self.rows = [where[s] for s in study_ids] if study_ids is not None else list(range(len(cache.entries)))
        self.studies = [as_study(cache.entries[i]) for i in self.rows]
        self.tasks = list(tasks) if tasks is not None else sorted({t for s in self.studies for t in s.labels})
        self.skipped: list[Any] = []  # the cache's errors.jsonl lists the studies prepare could not read

    def __len__(self) -> int:
        return len(self.rows)

    def set_epoch(self, epoch: int) -> None:
        """Items do not vary by epoch (the cache holds no sources to rescan)."""

    def label_vector(self, study: Any) -> list[float]:
        """Labels in `self.tasks` order, NaN where unknown."""
        return [math.nan if study.labels.get(t) is None else float(study.labels[t]) for t in self.tasks]

    def hu(self, i: int) -> Any:
        """Item i as int16 HU [D, H, W] (a torch tensor): what a loader hands to device-side windows and crops."""
        import torch

        return torch.from_numpy(self.cache.read_hu(self.rows[i]).copy())

    def __getitem__(self, i: int) -> Any:
        hu = self.hu(i)
        if self.hu_only:
            return hu
        import torch

        return {"image": windows_to_channels(hu, self.windows),
                "labels": torch.tensor(self.label_vector(self.studies[i]), dtype=torch.float32),
                "study_id": self.studies[i].study_id}
