"""What the confirmation stage costs on the embedded default: `kdsweep run` as a whole process from an
empty folder (its teacher trained first, as a newcomer's is), with the stage as shipped
(budget.confirm: {top: 1, seeds: 3}) and with it off (top: 0), alternated on the same machine.

  python benchmarks/confirm_cost.py              # 2 runs of each
  python benchmarks/confirm_cost.py --repeats 3

Prints one table (wall mean +- std, trials run, the champion's confirmed line) and the
confirmation table of the last run with the stage on.
"""
from __future__ import annotations

import argparse
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def run(folder: Path, extra: list[str]) -> tuple[float, str]:
    folder.mkdir(parents=True)
    start = time.perf_counter()
    out = subprocess.run([sys.executable, "-m", "orchestrator.cli", "run", *extra], cwd=folder, capture_output=True, text=True, check=True)
    return time.perf_counter() - start, out.stdout + out.stderr


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as d:
        root = Path(d)
        settings = {"confirm top 1 x 3 seeds (shipped)": [], "confirm off (top 0)": ["--set", "budget.confirm.top=0"]}
        walls: dict[str, list[float]] = {k: [] for k in settings}
        outs: dict[str, str] = {}
        for i in range(args.repeats):
            for name, extra in settings.items():
                wall, out = run(root / f"{i}-{name.split()[1]}", extra)
                walls[name].append(wall)
                outs[name] = out
    print("| embedded default `kdsweep run` | wall (s), mean +- std | runs | trials |")
    print("|---|---|---|---|")
    for name, w in walls.items():
        trials = len(re.findall(r"^done   trial=", outs[name], re.M))
        spread = f" +- {statistics.stdev(w):.1f}" if len(w) > 1 else ""
        print(f"| {name} | {statistics.mean(w):.1f}{spread} | {len(w)} | {trials} |")
    on, off = (statistics.mean(w) for w in walls.values())
    print(f"\nadded by the confirmation stage: {on - off:+.1f} s ({on / off:.2f}x)")
    shipped = outs[next(iter(settings))]
    table = re.search(r"^confirmation .*?\n(\|.*?)\n\n", shipped, re.M | re.S)
    line = re.search(r"^  confirmed on .*$", shipped, re.M)
    print("\n" + (table.group(1) if table else "(no confirmation table)") + "\n" + (line.group(0).strip() if line else ""))


if __name__ == "__main__":
    main()
