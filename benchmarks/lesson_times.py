"""How long does each lesson take to run top to bottom? Wall time per lesson, on whatever machine runs this.

    .venv/bin/python benchmarks/lesson_times.py                          # every lesson, full run
    .venv/bin/python benchmarks/lesson_times.py --smoke 00 03            # two lessons in CI's smoke mode
    .venv/bin/python benchmarks/lesson_times.py --out outputs/lesson_times.json

Each lesson runs in a fresh Python process, as a fresh kernel would: its code cells execute one after
the other in one namespace, with matplotlib's non-interactive backend, so a machine without Jupyter
(a rented GPU box) can time the lessons too. Outputs are not rendered and nothing is written back into
the notebooks; use ``jupyter nbconvert --execute`` for that. A lesson whose cell raises is reported as
failed with the cell's number, and timing goes on with the next lesson.

The README's table of full-run minutes comes from this script: the CPU column on the course's 2-core
machine, the GPU column on the lent GPU (which GPU is printed with the figures).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"


def run_cells(notebook: Path) -> dict:
    """Execute the notebook's code cells in this process (cwd = the notebook's folder); time each cell."""
    os.chdir(notebook.parent)
    cells = json.loads(notebook.read_text())["cells"]
    namespace: dict = {"__name__": "__main__"}
    timings, started = [], time.perf_counter()
    for number, cell in enumerate(cells):
        if cell["cell_type"] != "code":
            continue
        source = "".join(cell["source"])
        cell_start = time.perf_counter()
        try:
            exec(compile(source, f"{notebook.name}[cell {number}]", "exec"), namespace)
        except Exception as error:  # noqa: BLE001 - report which cell failed, then stop this lesson
            return {"ok": False, "seconds": time.perf_counter() - started, "failed_cell": number,
                    "error": f"{type(error).__name__}: {error}"[:500], "cells": timings}
        finally:
            import matplotlib.pyplot as plt

            plt.close("all")  # as a notebook frees figures once they are shown
        timings.append([number, round(time.perf_counter() - cell_start, 3)])
    return {"ok": True, "seconds": time.perf_counter() - started, "cells": timings}


def device_name() -> str:
    try:
        import torch

        if torch.cuda.is_available():
            return torch.cuda.get_device_name()
    except ImportError:
        pass
    return f"CPU ({os.cpu_count()} cores, {platform.processor() or platform.machine()})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("lessons", nargs="*", help="lesson numbers or file names (default: every lesson)")
    parser.add_argument("--smoke", action="store_true", help="CI's smoke mode (MINI_IMAGEN_SMOKE=1)")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds before a lesson is stopped")
    parser.add_argument("--out", default=None, help="also write the figures as JSON here")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # internal: run one notebook in this process
    args = parser.parse_args()
    if args.one:
        print(json.dumps(run_cells(Path(args.one))))
        return

    notebooks = sorted(NOTEBOOKS.glob("[0-9][0-9]_*.ipynb"))
    if args.lessons:
        notebooks = [nb for nb in notebooks if any(nb.name.startswith(key) or nb.name == key for key in args.lessons)]
        if not notebooks:
            parser.error(f"no lesson matches {args.lessons}; lessons: {[nb.name[:2] for nb in NOTEBOOKS.glob('*.ipynb')]}")
    env = {**os.environ, "MPLBACKEND": "Agg", "MINI_IMAGEN_SMOKE": "1" if args.smoke else "0"}
    env.pop("CI", None)  # CI would switch smoke mode on
    mode = "smoke" if args.smoke else "full"
    report = {"device": device_name(), "mode": mode, "lessons": {}}
    print(f"{report['device']}; {mode} runs", flush=True)
    for notebook in notebooks:
        try:
            done = subprocess.run([sys.executable, __file__, "--one", str(notebook)], env=env, capture_output=True,
                                  text=True, timeout=args.timeout)
            lines = done.stdout.strip().splitlines()
            result = json.loads(lines[-1]) if done.returncode == 0 and lines else {
                "ok": False, "seconds": None, "error": (done.stderr or done.stdout)[-500:]}
        except subprocess.TimeoutExpired:
            result = {"ok": False, "seconds": args.timeout, "error": f"stopped after {args.timeout:.0f} s"}
        report["lessons"][notebook.name] = result
        seconds = result["seconds"]
        status = "ok" if result["ok"] else f"FAILED (cell {result.get('failed_cell', '?')}): {result['error']}"
        print(f"{notebook.name:45s} {seconds / 60 if seconds is not None else float('nan'):6.1f} min  {status}",
              flush=True)
    total = sum(r["seconds"] or 0 for r in report["lessons"].values())
    print(f"{'all lessons':45s} {total / 60:6.1f} min", flush=True)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(report, indent=1))
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
