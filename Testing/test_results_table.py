"""benchmarks/RESULTS.md's "Current figures" table is what benchmarks/results/*.json say (issue 24 item 10)."""
from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "benchmarks" / "make_results.py"


def _make_results():
    spec = importlib.util.spec_from_file_location("make_results", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module   # dataclasses look their module up while the class is made
    spec.loader.exec_module(module)
    return module


def test_current_figures_table_is_up_to_date_with_the_json_files():
    done = subprocess.run([sys.executable, str(SCRIPT), "--check"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr


def test_check_catches_a_figure_edited_by_hand():
    make_results = _make_results()
    text = make_results.RESULTS_MD.read_text(encoding="utf-8")
    table = text.split(make_results.START, 1)[1].split(make_results.END, 1)[0]
    edited_table = table.replace("| 2.63 s |", "| 2.10 s |", 1)
    assert edited_table != table, "the analyze row's value is expected in the table"
    edited = text.replace(table, edited_table)
    assert make_results.with_table(edited) == text


def test_every_row_links_an_anchor_and_a_raw_file_that_exist():
    make_results = _make_results()
    text = make_results.RESULTS_MD.read_text(encoding="utf-8")
    for fig in make_results.FIGURES:
        assert f'<a id="{fig.section}"></a>' in text, fig.section
        assert (make_results.RAW / fig.raw).is_file(), fig.raw
