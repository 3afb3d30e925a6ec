"""Training never overwrites: an --out that already holds a run or a bundle is refused unless asked.

`fmct finetune --out EXISTING` used to replace a bundle silently, and `fmct pretrain --out EXISTING`
without --resume truncated losses.jsonl and mixed two runs in one folder. Both now exit 2 naming
the way on: --resume (pretraining continues the run in the folder) or --overwrite (the earlier
run's files are removed first, so nothing of it is mixed into the new one).
"""
from __future__ import annotations

import shutil
from pathlib import Path
from typing import Sequence

from fmct.conventions.errors import OutputFolderError


def check_training_out(out: str | Path, command: str, resume: bool = False, overwrite: bool = False,
                       can_resume: bool = True) -> Path:
    """Refuse an --out that holds anything unless resume or overwrite; an empty or new folder is fine."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise OutputFolderError(f"{command} --out {out} is a file; give a folder")
    if not out.is_dir() or not any(out.iterdir()) or resume or overwrite:
        return out
    ways = "--resume to continue that run, or --overwrite to replace it" if can_resume else "--overwrite to replace it"
    raise OutputFolderError(f"{command} --out {out} already holds an earlier run; give a new folder, or add {ways}")


def clear_run(out: str | Path, names: Sequence[str]) -> None:
    """--overwrite: remove the earlier run's own files (only these names; anything else is left)."""
    for name in names:
        path = Path(out) / name
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        elif path.exists() or path.is_symlink():
            path.unlink()
