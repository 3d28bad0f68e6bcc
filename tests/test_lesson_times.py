"""benchmarks/lesson_times.py: times lessons without Jupyter, and says which cell of which lesson failed."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "lesson_times.py"


def notebook(path: Path, *cells: str) -> Path:
    path.write_text(json.dumps({"cells": [{"cell_type": "markdown", "source": ["# title"]}] + [
        {"cell_type": "code", "source": [source]} for source in cells], "metadata": {}, "nbformat": 4,
        "nbformat_minor": 5}))
    return path


def run_one(path: Path) -> dict:
    done = subprocess.run([sys.executable, str(SCRIPT), "--one", str(path)], capture_output=True, text=True,
                          env={"MPLBACKEND": "Agg", "PATH": ""}, timeout=120)
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_cells_share_one_namespace_and_each_is_timed(tmp_path):
    result = run_one(notebook(tmp_path / "good.ipynb", "import time\nx = 2", "time.sleep(0.2)\ny = x * 3",
                              "assert y == 6\nprint('done')"))
    assert result["ok"] and [number for number, _ in result["cells"]] == [1, 2, 3]
    assert result["cells"][1][1] >= 0.2 and result["seconds"] >= 0.2


def test_a_failing_cell_is_named_and_the_lesson_stops_there(tmp_path):
    result = run_one(notebook(tmp_path / "bad.ipynb", "x = 1", "raise ValueError('no such prompt')", "x = 2"))
    assert not result["ok"] and result["failed_cell"] == 2
    assert result["error"] == "ValueError: no such prompt" and len(result["cells"]) == 1
