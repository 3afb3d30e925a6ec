"""The engine's run-time conventions, in one torch-free place.

Progress and cancel: every long engine function takes an optional ``progress(fraction, message)``
callback and an optional ``cancel()`` check; the CLI maps progress to tqdm, scripts and the Slicer
modules read JSON lines. Devices: the user names one device string ("auto", "cpu", "cuda",
"cuda:N"); it is checked here, once, and resolved to torch or onnxruntime terms by the caller's
backend. Autocast: bf16 on CUDA, nothing on CPU. Explanation methods: their names live here so the
CLI and the Slicer module offer exactly what `fmct.inference.explain` implements.

torch is imported inside the functions that need it, so the onnxruntime path never imports it.
"""
from __future__ import annotations

import math
import os
import sys
from contextlib import nullcontext
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, ContextManager

from fmct.conventions.errors import Cancelled, ConfigError

if TYPE_CHECKING:
    import torch

Progress = Callable[[float, str], None]
CancelCheck = Callable[[], bool]

DEVICE_CHOICES = ("auto", "cpu", "cuda", "cuda:N")
EXPLAIN_METHODS = ("integrated_gradients", "occlusion", "attention", "attention_rollout")
DEFAULT_EXPLAIN = "integrated_gradients"
# Which findings get a map: "auto" is every positive finding on a GPU (well under a second a map) but only
# the top one on a CPU (tens of seconds a map); "top" is the finding shown first (the positive finding
# furthest above its threshold); the others are one request away (--findings NAME, or a click in Slicer).
EXPLAIN_FINDINGS_CHOICES = ("auto", "top", "positive", "all")
DEFAULT_EXPLAIN_FINDINGS = "auto"


def passive_threads() -> None:
    """Make OpenMP threads sleep instead of spinning when they wait (OMP_WAIT_POLICY=PASSIVE), unless the
    user chose otherwise. Must run before torch is imported: the OpenMP runtime reads it once, at start.

    torch's default (ACTIVE: spin ~200 ms at every barrier) is fastest on an idle machine, but when
    another process wants a core (Slicer's GUI, a second analysis, a batch's readers) the spinning
    threads take it: the default analyze measured 3.4-4.6x slower at load 3-4, PASSIVE 3-4% slower
    when quiet (issue 27). The CLI and the Slicer worker call this first thing.
    """
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def no_progress(fraction: float, message: str) -> None:
    """The progress callback of callers that did not ask for one."""


def progress_or_silent(progress: Progress | None) -> Progress:
    """A callable progress reporter, whether or not the caller gave one."""
    return progress or no_progress


def sub_progress(progress: Progress | None, lo: float, hi: float, prefix: str = "") -> Progress:
    """A progress callback for one stage that fills [lo, hi] of the caller's bar."""
    notify = progress_or_silent(progress)

    def sub(fraction: float, message: str) -> None:
        notify(lo + (hi - lo) * min(max(fraction, 0.0), 1.0), f"{prefix}{message}" if prefix else message)

    return sub


def check_cancel(cancel: CancelCheck | None, what: str = "Analysis") -> None:
    """Raise Cancelled when the caller's cancel check says so."""
    if cancel is not None and cancel():
        raise Cancelled(f"{what} cancelled")


def parse_device(device: str | None) -> str:
    """Check a user's device name and return it normalised: auto, cpu, cuda or cuda:N (gpu, gpu:N alike).

    Names only; whether that device exists is for `torch_device` / the onnxruntime providers.
    """
    name = (device or "auto").strip().lower()
    if name == "gpu" or (name.startswith("gpu:") and name[4:].isdigit()):
        name = "cuda" + name[3:]  # what the Slicer panels and most users call it
    if name in ("auto", "cpu", "cuda"):
        return name
    if name.startswith("cuda:") and name[5:].isdigit():
        return name
    raise ConfigError(f"unknown device '{device}'; choose auto, cpu, cuda (or gpu) or cuda:N")


def device_index(device: str) -> int | None:
    """N of cuda:N, else None."""
    name = parse_device(device)
    return int(name[5:]) if name.startswith("cuda:") else None


def cuda_may_be_present() -> bool:
    """Whether device "auto" could resolve to a GPU, decided without importing torch (1-2 s of a cold start).

    No for a CPU-only torch build (version "+cpu"), on macOS, and on Linux when no NVIDIA driver is
    loaded (/proc/driver/nvidia, visible inside containers too) and torch is not a ROCm build; yes
    when unsure, so that a GPU is never passed over.
    """
    from importlib.metadata import PackageNotFoundError, version  # only on this path: its import is not free

    try:
        build = version("torch")
    except PackageNotFoundError:
        build = ""
    if build.endswith("+cpu") or sys.platform == "darwin":
        return False
    if sys.platform.startswith("linux"):
        return "+rocm" in build or os.path.exists("/proc/driver/nvidia/version")
    return True


@dataclass(frozen=True)
class Rank:
    """This process's place among torchrun's processes (one process when torchrun is not used)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def torchrun_rank(env: "dict[str, str] | None" = None) -> Rank:
    """RANK, WORLD_SIZE and LOCAL_RANK as torchrun sets them: the one reader, for analysis batches and
    training alike. LOCAL_RANK defaults to RANK (one node; a device is then picked as LOCAL_RANK modulo
    the devices present). A malformed environment is a user mistake (exit 2), not a traceback."""
    env = os.environ if env is None else env
    try:
        rank, world = int(env.get("RANK", 0)), int(env.get("WORLD_SIZE", 1))
        local = int(env.get("LOCAL_RANK", rank))
    except ValueError as e:
        raise ConfigError(f"RANK / WORLD_SIZE / LOCAL_RANK must be integers ({e}); launch with torchrun or unset them") from e
    if world < 1 or not 0 <= rank < world or local < 0:
        raise ConfigError(f"RANK={rank} / WORLD_SIZE={world} / LOCAL_RANK={local} are inconsistent; RANK must be in "
                          f"[0, WORLD_SIZE) and LOCAL_RANK >= 0 (launch with torchrun or unset them)")
    return Rank(rank, world, local)


def torch_device(device: str | None = "auto") -> "torch.device":
    """The torch device for a user's device name, refusing a GPU that is not there."""
    import torch

    name = parse_device(device)
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ConfigError(f"device '{name}' was asked for but no CUDA GPU is available; use --device cpu or auto")
        index = device_index(name)
        if index is not None and index >= torch.cuda.device_count():
            raise ConfigError(f"device '{name}' does not exist: this machine has {torch.cuda.device_count()} CUDA GPU(s)")
    return torch.device(name)


def autocast(device: "torch.device | str") -> ContextManager[Any]:
    """bf16 autocast on CUDA (where SDPA dispatches to flash / memory-efficient attention), else nothing."""
    kind = device if isinstance(device, str) else device.type
    if str(kind).startswith("cuda"):
        import torch

        return torch.autocast("cuda", dtype=torch.bfloat16)
    return nullcontext()


def check_explain_method(method: str | None) -> None:
    """Refuse an explanation method fmct.inference.explain does not implement (None means no explanation)."""
    if method is not None and method not in EXPLAIN_METHODS:
        raise ConfigError(f"unknown explanation method '{method}'; choose one of {', '.join(EXPLAIN_METHODS)} or none")


def explain_method_or_none(method: str | None) -> str | None:
    """A user's --explain value: 'none' (any case) or empty means no explanation."""
    if method is None or str(method).strip().lower() in ("", "none"):
        return None
    method = str(method).strip().lower()
    check_explain_method(method)
    return method


# ============================================================================ JSON-lines progress
# A process that works for another one (the Slicer module's analysis worker, a training run
# followed by a panel) reports on its stdout, one JSON object per line, so the reader needs no
# regex over a progress bar: {"event": "progress", "fraction": 0.42, "message": "explaining subdural"}
# and other events ({"event": "done", ...}, {"event": "error", "type": ..., "message": ...}).
PROGRESS_EVENT = "progress"


class JsonLinesProgress:
    """A ``progress(fraction, message)`` callback that writes JSON lines, plus ``event(kind, **fields)``.

    Each line is flushed at once (the reader is waiting on a pipe). ``min_interval_s`` drops
    progress lines that come faster than the reader can use (an Integrated Gradients run calls
    progress per batch) when they only move the fraction: the first, the last (fraction 1), every
    change of message (a new stage) and every other event always go out.
    """

    def __init__(self, stream: Any = None, min_interval_s: float = 0.0) -> None:
        import sys

        self.stream = stream if stream is not None else sys.stdout
        self.min_interval_s = min_interval_s
        self._last = float("-inf")
        self._message: str | None = None

    def __call__(self, fraction: float, message: str) -> None:
        import time

        now = time.monotonic()
        fraction = min(max(float(fraction), 0.0), 1.0)
        if fraction < 1.0 and message == self._message and now - self._last < self.min_interval_s:
            return
        self._last, self._message = now, message
        self.event(PROGRESS_EVENT, fraction=round(fraction, 4), message=str(message))

    def event(self, kind: str, **fields: Any) -> None:
        import json

        self.stream.write(json.dumps({"event": kind, **fields}) + "\n")
        self.stream.flush()


def read_json_line(line: str | bytes) -> dict[str, Any] | None:
    """The event of one line written by JsonLinesProgress, or None for any other line (a library's
    own print, a partial line): readers skip what they do not understand instead of failing."""
    import json

    if isinstance(line, bytes):
        line = line.decode("utf-8", errors="replace")
    line = line.strip()
    if not line.startswith("{"):
        return None
    try:
        record = json.loads(line)
    except (ValueError, RecursionError):
        return None
    if not isinstance(record, dict):
        return None
    if record.get("event") == PROGRESS_EVENT:  # a progress line must carry a finite fraction, or it is not one
        fraction = record.get("fraction", 0.0)
        if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not math.isfinite(fraction):
            return None
    return record
