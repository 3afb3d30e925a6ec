"""Manifests: which CT studies there are, where they are, and which labels they have.

A *manifest* is a list of `Study` records (where the CT is, which labels it has). It can be built
from a folder of studies, from a CSV, or from the public layouts of RSNA Intracranial Hemorrhage
2019 and CQ500, so training code never needs to know where the data came from. Labels use the
task names of `fmct.conventions.tasks.TASKS`; a missing label is None (unlabeled data is fine for
pretraining).

Torch-free on purpose: listing, checking and converting a dataset (and writing the manifest CSV
that `write_manifest_csv` saves) needs no deep-learning stack; `fmct.data.datasets` turns a manifest into
tensors.

Study ids never contain patient names or IDs: they are folder/file names as given, public dataset
case names (CQ500), or hashes of DICOM UIDs (RSNA). No patient tag is ever read.
"""
from __future__ import annotations

import csv
import hashlib
import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

from fmct.reading.dicom import read_header
from fmct.conventions.csv_table import read_csv_table
from fmct.conventions.errors import ConfigError, EmptyInputError, UnreadableInputError
from fmct.conventions.tasks import TASKS
from fmct.reading.volume import FORMATS, format_suffix

log = logging.getLogger("fmct.data.manifests")

ID_COLUMNS = ("study_id", "case_id", "id", "name")
PATH_COLUMN = "path"
LABELS_CSV = "labels.csv"  # the one CSV a folder of studies may carry: a manifest (path column) or labels by id
MISSING = {"", "na", "nan", "none", "null", "-"}

RSNA_SUBTYPES = {
    "any": "any_hemorrhage", "epidural": "epidural", "intraparenchymal": "intraparenchymal",
    "intraventricular": "intraventricular", "subarachnoid": "subarachnoid", "subdural": "subdural",
}
CQ500_FINDINGS = {
    "ICH": "any_hemorrhage", "IPH": "intraparenchymal", "IVH": "intraventricular", "SDH": "subdural",
    "EDH": "epidural", "SAH": "subarachnoid", "Fracture": "fracture", "MassEffect": "mass_effect",
    "MidlineShift": "midline_shift",
}
_CQ500_FOLDER = re.compile(r"^CQ500[-_ ]?CT[-_ ]?(\d+)", re.IGNORECASE)
_CQ500_NAME = re.compile(r"^CQ500[-_ ]?CT[-_ ]?(\d+)$", re.IGNORECASE)
_READER_COLUMN = re.compile(r"^R(\d+):(.+)$")



@dataclass
class Study:
    """One CT study to train or evaluate on.

    path: a DICOM folder or an image file; for flat per-slice layouts (RSNA) the folder that
    holds `files`. files: the study's own DICOM files when they share a folder with other
    studies, else None. series_uid: which series to read when a folder holds several.
    labels: task name -> 0/1, None where unknown. group: the study this item is one series of, when a
    dataset lists several series per study (FM-HCT's split files); splits keep a group together and
    study-level metrics pool it. None: the item is its own study.
    """

    study_id: str
    path: Path
    labels: dict[str, int | None] = field(default_factory=dict)
    series_uid: str | None = None
    files: tuple[Path, ...] | None = None
    group: str | None = None

    @property
    def study(self) -> str:
        """The study this item belongs to (its group, else itself)."""
        return self.group or self.study_id

    def __post_init__(self) -> None:
        self.path = Path(self.path)
        if self.files is not None:
            self.files = tuple(Path(f) for f in self.files)


class Manifest(list):
    """A list of `Study`; `skipped` names the inputs left out while building it (not patient data)."""

    def __init__(self, studies: Iterable[Study] = (), skipped: Iterable[str] = ()) -> None:
        super().__init__(studies)
        self.skipped: list[str] = list(skipped)

    @property
    def tasks(self) -> list[str]:
        """Every task with a label in some study: known tasks in TASKS order, then others sorted."""
        names = {t for s in self for t in s.labels}
        return [t for t in TASKS if t in names] + sorted(names - set(TASKS))


def load_manifest(source: str | Path, layout: str = "auto", path_prefix: str | None = None, **kwargs: Any) -> Manifest:
    """Build a manifest from a CSV file or a dataset folder; `layout` "auto" recognises the folder.

    auto: a .csv with columns img_path and name is one of FM-HCT's split files (`path_prefix` "OLD=NEW"
    points their img_path at your copy); another .csv file is a manifest CSV; a folder with reads.csv is
    CQ500; a folder with stage_2_train.csv and stage_2_train/ is RSNA; a folder with a labels.csv that has
    a path column (as `fmct.phantom.write_phantom_set` writes) is that CSV; any other folder is a folder
    of studies (`studies_in_folder`: the one rule `fmct analyze --batch` shares).
    """
    source = Path(source)
    if not source.exists():
        raise EmptyInputError(f"{source} does not exist. Check the path (and that the drive is mounted).")
    layout = _detect_layout(source) if layout == "auto" else layout
    if path_prefix and layout != "fm-hct":
        raise ConfigError(f"--path-prefix applies to FM-HCT's split files (columns img_path, name); {source.name} is "
                          f"read as layout '{layout}'")
    if layout == "fm-hct":
        return manifest_from_fm_hct(source, path_prefix)
    if layout == "csv":
        return manifest_from_csv(source / "labels.csv" if source.is_dir() else source, **kwargs)
    if layout == "folder":
        return studies_in_folder(source, **kwargs)
    if layout == "rsna":
        return manifest_from_rsna(source / "stage_2_train", source / "stage_2_train.csv", **kwargs)
    if layout == "cq500":
        return manifest_from_cq500(source, source / "reads.csv", **kwargs)
    raise ConfigError(f"Unknown data layout {layout!r}: use 'auto', 'folder', 'csv', 'fm-hct', 'rsna' or 'cq500'.")


def _detect_layout(source: Path) -> str:
    if source.is_file():
        if source.suffix.lower() == ".csv":
            return "fm-hct" if {"img_path", "name"} <= set(_read_header(source)) else "csv"
        raise ConfigError(f"{source.name} is a file: give a manifest .csv or a dataset folder.")
    if (source / "reads.csv").is_file():
        return "cq500"
    if (source / "stage_2_train.csv").is_file() and (source / "stage_2_train").is_dir():
        return "rsna"
    if folder_manifest_csv(source) is not None:
        return "csv"
    return "folder"  # studies_in_folder: a labels.csv without a path column gives labels by id, or is ignored


# --------------------------------------------------------------------------------------------
# Folder of studies
# --------------------------------------------------------------------------------------------

def studies_in_folder(root: str | Path, exclude: Sequence[str | Path] = (),
                      label_columns: Sequence[str] | None = None) -> Manifest:
    """The one rule for the studies in a folder, shared by `fmct analyze --batch` and the training
    commands (pretrain, embed, finetune, evaluate).

    A labels.csv with a path column is a manifest: its rows are the studies (the layout `fmct
    phantom` writes, NIfTI or DICOM; study_id and case_id are accepted alike). Otherwise the studies
    are the folder's entries (`folder_entries`), labelled from a labels.csv that has an id column;
    any other CSV, or a labels.csv with neither column, is named as ignored: pretraining needs no
    labels, and an unrelated spreadsheet in a folder of CTs must not stop it.
    """
    root = _existing_dir(root)
    manifest = folder_manifest_csv(root)
    if manifest is not None:
        return manifest_from_csv(manifest, label_columns=label_columns)
    labels_csv = root / LABELS_CSV
    use_labels = labels_csv if labels_csv.is_file() and _pick_id_column(_csv_columns(labels_csv)) else None
    for other in sorted(p for p in root.iterdir() if p.is_file() and p.suffix.lower() == ".csv" and p != use_labels):
        log.warning("%s: ignored (columns %s): a CSV in a folder of studies is read only as labels.csv with a '%s' "
                    "column (a manifest) or an id column (%s)", other.name, ", ".join(_csv_columns(other)) or "none",
                    PATH_COLUMN, ", ".join(ID_COLUMNS))
    return manifest_from_folder(root, use_labels, label_columns, exclude=exclude)


def folder_manifest_csv(root: Path) -> Path | None:
    """The folder's labels.csv when it is a manifest (it has a path column), else None."""
    labels_csv = Path(root) / LABELS_CSV
    return labels_csv if labels_csv.is_file() and PATH_COLUMN in _csv_columns(labels_csv) else None


def refuse_several_studies(path: Path) -> None:
    """`fmct analyze FOLDER` without --batch: a folder of several studies is said to be one (rather
    than one of them analyzed and another named by --series). Several: a labels.csv manifest with
    two or more rows, or two or more image files by the folder rule; DICOM subfolders alone stay one
    study (a study's series may sit in subfolders)."""
    if not path.is_dir():
        return
    manifest = folder_manifest_csv(path)
    if manifest is not None:
        ids = [s.study_id for s in manifest_from_csv(manifest)]
    else:
        entries = folder_entries(path)
        ids = [i for i, _ in entries] if sum(p.is_file() for _, p in entries) >= 2 else []
    if len(ids) >= 2:
        shown = ", ".join(ids[:3]) + (", ..." if len(ids) > 3 else "")
        raise ConfigError(f"{path} holds {len(ids)} studies ({shown}): analyze them all with "
                          f"`fmct analyze {path} --batch`, or give one study's folder or file")


def folder_entries(root: Path, exclude: Sequence[str | Path] = ()) -> list[tuple[str, Path]]:
    """(study id, path) for each study directly in root: every image file (NIfTI, NRRD, MHA), named
    after it, and every subfolder (`subfolder_study`), named after the folder; hidden entries,
    other files and the excluded paths (an output folder inside the input) are skipped."""
    skip = {Path(p).resolve() for p in exclude}
    found = []
    for entry in sorted(root.iterdir()):
        if entry.name.startswith(".") or entry.resolve() in skip:
            continue
        if entry.is_dir():
            found.append((entry.name, subfolder_study(entry)))
        elif entry.is_file() and format_suffix(entry) in FORMATS:
            found.append((entry.name[: -len(format_suffix(entry))], entry))
    return found


def subfolder_study(folder: Path) -> Path:
    """What a study's subfolder holds: its CT image file when it has one named ct.* (masks and
    info.json beside it, as `fmct phantom --format nifti` writes) or exactly one image file; else
    the folder itself, a DICOM study (its series are found inside)."""
    images = [p for p in sorted(folder.iterdir()) if p.is_file() and format_suffix(p) in FORMATS]
    named_ct = [p for p in images if p.name[: -len(format_suffix(p))].lower() == "ct"]
    if len(named_ct) == 1:
        return named_ct[0]
    return images[0] if len(images) == 1 else folder


def manifest_from_folder(root: str | Path, labels_csv: str | Path | None = None,
                         label_columns: Sequence[str] | None = None, exclude: Sequence[str | Path] = ()) -> Manifest:
    """One study per subfolder or image file directly in `root` (`folder_entries`).

    The study id is the folder name or the file name without extension. `labels_csv`, if given,
    has an id column (study_id, case_id, id or name) and one column per task.
    """
    root = _existing_dir(root)
    labels = _labels_by_id(Path(labels_csv), label_columns) if labels_csv else {}
    studies = [Study(study_id, path, labels.get(study_id, {})) for study_id, path in folder_entries(root, exclude)]
    _check_unique_ids(studies, root)
    unmatched = set(labels) - {s.study_id for s in studies}
    if unmatched:
        log.warning("%d id(s) in %s match no study in %s", len(unmatched), Path(labels_csv).name, root)
    return Manifest(studies)


def _csv_columns(csv_path: Path) -> list[str]:
    """The header of a CSV (empty when it cannot be read as one)."""
    try:
        with open(csv_path, newline="", encoding="utf-8-sig") as fh:
            return [c.strip() for c in next(csv.reader(fh), []) if c.strip()]
    except (OSError, UnicodeDecodeError, csv.Error):
        return []


def _labels_by_id(csv_path: Path, label_columns: Sequence[str] | None) -> dict[str, dict[str, int | None]]:
    rows, columns = _read_csv(csv_path)
    id_column = _pick_id_column(columns)
    if id_column is None:
        raise ConfigError(f"{csv_path.name}: no id column; name one of {', '.join(ID_COLUMNS)}.")
    tasks = _label_columns(rows, columns, {id_column}, label_columns, csv_path)
    return {row[id_column]: _parse_labels(row, tasks, csv_path) for row in rows}


# --------------------------------------------------------------------------------------------
# CSV
# --------------------------------------------------------------------------------------------

def manifest_from_csv(csv_path: str | Path, path_column: str = PATH_COLUMN, id_column: str | None = None,
                      label_columns: Sequence[str] | None = None) -> Manifest:
    """One study per row: a path (relative to the CSV's folder, or absolute) and label columns.

    Without `label_columns`, every other column whose values are all 0, 1 or empty is a label
    (so extra columns such as slice thickness are left alone). Optional columns `series_uid` and
    `files` (";"-separated, relative to the path) are read back as `write_manifest_csv` writes them.
    """
    csv_path = Path(csv_path)
    rows, columns = _read_csv(csv_path)
    if path_column not in columns:
        raise ConfigError(f"{csv_path.name}: no '{path_column}' column (columns: {', '.join(columns)}); a manifest CSV "
                          f"has a '{path_column}' column (where each study is) and study_id or case_id. Give the folder "
                          "of CTs instead to use every study in it.")
    id_column = id_column or _pick_id_column(columns)
    reserved = {path_column, "series_uid", "files"} | ({id_column} if id_column else set())
    tasks = _label_columns(rows, columns, reserved, label_columns, csv_path)
    studies = [_study_from_row(row, csv_path.parent, path_column, id_column, tasks, csv_path) for row in rows]
    _check_unique_ids(studies, csv_path)
    return Manifest(studies)


def _study_from_row(row: dict[str, str], base: Path, path_column: str, id_column: str | None,
                    tasks: list[str], csv_path: Path) -> Study:
    path = base / row[path_column].strip()
    study_id = row[id_column].strip() if id_column else path.name.split(".")[0]
    files = row.get("files") or ""
    return Study(
        study_id, path, _parse_labels(row, tasks, csv_path), (row.get("series_uid") or "").strip() or None,
        tuple(path / f for f in files.split(";")) if files.strip() else None,
    )


def write_manifest_csv(manifest: Sequence[Study], csv_path: str | Path) -> Path:
    """Write a manifest so it can be inspected, edited and read back with `manifest_from_csv`.

    Building an RSNA manifest reads every slice header; saving it avoids doing that again.
    """
    csv_path = Path(csv_path)
    csv_path.parent.mkdir(parents=True, exist_ok=True)
    tasks = Manifest(manifest).tasks
    with open(csv_path, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["study_id", "path", "series_uid", "files", *tasks])
        for s in manifest:
            files = ";".join(os.path.relpath(f, s.path) for f in s.files) if s.files else ""
            labels = ["" if s.labels.get(t) is None else str(s.labels[t]) for t in tasks]
            writer.writerow([s.study_id, _relative_to(s.path, csv_path.parent), s.series_uid or "", files, *labels])
    return csv_path


def _relative_to(path: Path, base: Path) -> str:
    try:
        return os.path.relpath(path.resolve(), base.resolve())
    except ValueError:  # another drive on Windows
        return str(path.resolve())


def _read_csv(csv_path: Path) -> tuple[list[dict[str, str]], list[str]]:
    """UTF-8/UTF-16 with a byte-order mark, tabs, spaces after commas read; ';' and Latin-1 refused, saying so."""
    return read_csv_table(csv_path)


def _read_header(csv_path: Path) -> list[str]:
    with open(csv_path, newline="", encoding="utf-8-sig") as fh:
        return [c.strip() for c in next(csv.reader(fh), [])]


def _pick_id_column(columns: list[str]) -> str | None:
    return next((c for c in ID_COLUMNS if c in columns), None)


def _label_columns(rows: list[dict[str, str]], columns: list[str], reserved: set[str],
                   label_columns: Sequence[str] | None, csv_path: Path) -> list[str]:
    if label_columns is not None:
        missing = [c for c in label_columns if c not in columns]
        if missing:
            raise ConfigError(f"{csv_path.name}: label column(s) {', '.join(missing)} not found "
                              f"(columns: {', '.join(columns)}).")
        return list(label_columns)
    for c in columns:  # a finding's own column is never skipped for a typo: that would drop the whole task
        if c in TASKS and c not in reserved:
            for n, r in enumerate(rows, start=2):
                if not _is_binary(r.get(c, ""), True):
                    raise ConfigError(f"{csv_path.name}, line {n}: column '{c}' holds {r.get(c, '').strip()!r}; a "
                                      "finding's label must be 0, 1 or empty (empty: not known). Correct that cell.")
    chosen = [c for c in columns if c not in reserved and all(_is_binary(r.get(c, ""), c in TASKS) for r in rows)]
    log.info("%s: label columns %s", csv_path.name, ", ".join(chosen) or "(none)")
    return chosen


def _is_binary(text: str, known_task: bool) -> bool:
    """0/1/empty. A column that is not a known task must write 0 and 1 as integers, so that a
    measurement that happens to be 1.0 everywhere (slice thickness, say) is not taken as a label."""
    text = text.strip()
    if text.lower() in MISSING:
        return True
    return _as_label(text) is not None if known_task else text in ("0", "1")


def _as_label(text: str) -> int | None:
    try:
        value = float(text)
    except ValueError:
        return None
    return int(value) if value in (0.0, 1.0) else None


def _parse_labels(row: dict[str, str], tasks: list[str], csv_path: Path) -> dict[str, int | None]:
    labels: dict[str, int | None] = {}
    for task in tasks:
        text = (row.get(task) or "").strip()
        if text.lower() in MISSING:
            labels[task] = None
            continue
        value = _as_label(text)
        if value is None:
            raise ConfigError(f"{csv_path.name}: column '{task}' holds {text!r}; labels must be 0, 1 or empty.")
        labels[task] = value
    return labels


def _check_unique_ids(studies: list[Study], source: Path) -> None:
    seen: set[str] = set()
    for s in studies:
        if s.study_id in seen:
            raise ConfigError(f"{source.name}: study id {s.study_id!r} appears twice; ids must be unique.")
        seen.add(s.study_id)


def _existing_dir(root: str | Path) -> Path:
    root = Path(root)
    if not root.is_dir():
        raise EmptyInputError(f"{root} is not a folder. Check the path (and that the drive is mounted).")
    return root


# --------------------------------------------------------------------------------------------
# RSNA Intracranial Hemorrhage Detection (2019)
# --------------------------------------------------------------------------------------------

def manifest_from_rsna(images_dir: str | Path, labels_csv: str | Path | None = None) -> Manifest:
    """Studies rebuilt from RSNA's flat per-slice files; a study is positive when any slice is.

    RSNA ships one DICOM per slice (`ID_<sop>.dcm`) and labels per slice (`ID_<sop>_<subtype>`).
    Slices are grouped into series by the StudyInstanceUID + SeriesInstanceUID in their headers
    (file names carry no study information). Every header is read once; save the result with
    `write_manifest_csv` to skip that next time. Slices whose header cannot be read are left out
    and listed in `manifest.skipped`. The study id is a hash of the two UIDs.
    """
    images_dir = _existing_dir(images_dir)
    slice_labels = _rsna_slice_labels(Path(labels_csv)) if labels_csv else {}
    groups: dict[tuple[str, str], list[Path]] = {}
    skipped = []
    for path in sorted(p for p in images_dir.iterdir() if p.suffix.lower() == ".dcm"):
        uids = _study_series_uids(path)
        if uids is None:
            log.warning("Skipping unreadable DICOM file %s", path)
            skipped.append(str(path))
            continue
        groups.setdefault(uids, []).append(path)
    found = {p.stem for files in groups.values() for p in files}
    missing = len(set(slice_labels) - found - {Path(s).stem for s in skipped})
    if missing:
        log.warning("%d labelled slice(s) in %s have no image in %s", missing, Path(labels_csv).name, images_dir)
    studies = [_rsna_study(images_dir, uids, files, slice_labels) for uids, files in sorted(groups.items())]
    return Manifest(studies, skipped)


def _rsna_slice_labels(csv_path: Path) -> dict[str, dict[str, int]]:
    """'ID_<sop>' -> {task: 0/1} from rows ID_<sop>_<subtype>,Label."""
    rows, columns = _read_csv(csv_path)
    if not {"ID", "Label"} <= set(columns):
        raise ConfigError(f"{csv_path.name}: expected columns ID,Label (RSNA stage_2_train.csv), got {', '.join(columns)}.")
    labels: dict[str, dict[str, int]] = {}
    for row in rows:
        sop, _, subtype = row["ID"].strip().rpartition("_")
        task = RSNA_SUBTYPES.get(subtype)
        value = _as_label(row["Label"].strip())
        if not sop or task is None or value is None:
            raise ConfigError(f"{csv_path.name}: row {row['ID']!r},{row['Label']!r} is not ID_<sop>_<subtype>,0|1 "
                              f"with a subtype in {', '.join(RSNA_SUBTYPES)}.")
        labels.setdefault(sop, {})[task] = value
    return labels


def _study_series_uids(path: Path) -> tuple[str, str] | None:
    """(StudyInstanceUID, SeriesInstanceUID) from the header only, or None for an unreadable file."""
    try:
        header = read_header(path)
    except UnreadableInputError:
        return None
    return None if header is None else (header.study_uid, header.series_uid)


def _rsna_study(images_dir: Path, uids: tuple[str, str], files: list[Path],
                slice_labels: dict[str, dict[str, int]]) -> Study:
    labels: dict[str, int | None] = {}
    for task in RSNA_SUBTYPES.values():
        values = [slice_labels[f.stem][task] for f in files if task in slice_labels.get(f.stem, {})]
        labels[task] = max(values) if values else None
    if all(v is None for v in labels.values()):
        labels = {}
    study_id = "rsna-" + hashlib.sha256("\\".join(uids).encode()).hexdigest()[:16]
    return Study(study_id, images_dir, labels, uids[1] or None, tuple(files))


# --------------------------------------------------------------------------------------------
# CQ500
# --------------------------------------------------------------------------------------------

def manifest_from_cq500(root: str | Path, reads_csv: str | Path | None = None) -> Manifest:
    """One study per `CQ500CT<N> ...` folder, labelled by the majority of the readers in reads.csv.

    reads.csv has one row per case (name "CQ500-CT-<N>") and columns R<k>:<finding>; a label is 1
    when more than half of the readers who read it say 1. The reader picks the series (the axial
    CT with the most slices); the study id is the public case name, e.g. "CQ500-CT-0".
    """
    root = _existing_dir(root)
    reads = _cq500_reads(Path(reads_csv)) if reads_csv else {}
    studies = []
    for entry in sorted(root.iterdir(), key=lambda p: _cq500_number(p.name) or -1):
        number = _cq500_number(entry.name)
        if entry.is_dir() and number is not None:
            name = f"CQ500-CT-{number}"
            studies.append(Study(name, entry, reads.get(name, {})))
    missing = len(set(reads) - {s.study_id for s in studies})
    if missing:
        log.warning("%d case(s) in %s have no folder in %s", missing, Path(reads_csv).name, root)
    return Manifest(studies)


def _cq500_number(name: str) -> int | None:
    match = _CQ500_FOLDER.match(name)
    return int(match.group(1)) if match else None


def _cq500_reads(csv_path: Path) -> dict[str, dict[str, int | None]]:
    rows, columns = _read_csv(csv_path)
    if "name" not in columns:
        raise ConfigError(f"{csv_path.name}: no 'name' column; expected the CQ500 reads.csv.")
    by_finding: dict[str, list[str]] = {}
    for column in columns:
        match = _READER_COLUMN.match(column)
        if match and match.group(2) in CQ500_FINDINGS:
            by_finding.setdefault(CQ500_FINDINGS[match.group(2)], []).append(column)
    if not by_finding:
        raise ConfigError(f"{csv_path.name}: no reader columns such as R1:ICH; expected the CQ500 reads.csv.")
    reads = {}
    for row in rows:
        match = _CQ500_NAME.match(row["name"].strip())
        if match is None:
            continue
        votes = {task: [_as_label(row[c].strip()) for c in cols] for task, cols in by_finding.items()}
        reads[f"CQ500-CT-{int(match.group(1))}"] = {task: majority(v) for task, v in votes.items()}
    return reads


def majority(votes: Sequence[int | None]) -> int | None:
    """1 when more than half of the given (non-missing) votes are 1; None when there are none."""
    given = [v for v in votes if v is not None]
    return None if not given else int(2 * sum(given) > len(given))


# --------------------------------------------------------------------------------------------
# FM-HCT's split files (NYUMedML/HeadCT-Foundation, datasets/*/*_label.csv)
# --------------------------------------------------------------------------------------------

def parse_path_prefix(text: str | None) -> tuple[str, str] | None:
    """'OLD=NEW' -> (OLD, NEW); None stays None."""
    if not text:
        return None
    old, sep, new = text.partition("=")
    if not sep or not old:
        raise ConfigError(f"--path-prefix {text!r}: write it as OLD=NEW (the start of img_path in the CSV, then "
                          "where that folder is on this machine)")
    return old, new


def manifest_from_fm_hct(csv_path: str | Path, path_prefix: str | None = None) -> Manifest:
    """FM-HCT's split CSV (`img_path, ICH, IPH, ..., name`): one item per row (a series), grouped by `name`
    (the study). Labels map onto fmct's tasks as CQ500's do (ICH -> any_hemorrhage, ...); other columns
    are left alone. Relative img_path values are relative to the CSV's folder."""
    csv_path = Path(csv_path)
    rows, columns = _read_csv(csv_path)
    tasks = [c for c in columns if c in CQ500_FINDINGS]
    if "img_path" not in columns or "name" not in columns or not tasks:
        raise ConfigError(f"{csv_path.name}: an FM-HCT split file has columns img_path, name and labels such as "
                          f"{', '.join(CQ500_FINDINGS)}; found {', '.join(columns)}")
    prefix = parse_path_prefix(path_prefix)
    studies, counts = [], {}
    for n, row in enumerate(rows, start=2):
        raw, study = row["img_path"].strip(), row["name"].strip()
        if not raw or not study:
            raise ConfigError(f"{csv_path.name} line {n}: img_path and name must not be empty")
        if prefix:
            if not raw.startswith(prefix[0]):
                raise ConfigError(f"{csv_path.name} line {n}: img_path {raw!r} does not start with the --path-prefix "
                                  f"{prefix[0]!r}; give the prefix these paths share")
            raw = prefix[1] + raw[len(prefix[0]):]
        labels = {CQ500_FINDINGS[t]: v for t, v in _parse_labels(row, tasks, csv_path).items()}
        counts[study] = counts.get(study, 0) + 1
        series = Path(raw).name.split(".")[0] or str(counts[study])
        studies.append(Study(f"{study}/{series}", csv_path.parent / raw, labels, group=study))
    _check_unique_ids(studies, csv_path)
    return Manifest(studies)
