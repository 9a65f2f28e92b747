"""Each method's paired gain over `equal` (NE for binary tasks, MSE for regression, % of `equal`'s) with
its 95% interval, on seeds 0-9, on seeds 10-19 and on all 20, from `concord compare --seeds 20` output
folders (their runs/): the check of the "Fresh seeds" section of docs/quality/README.md.

    python docs/quality/fresh-seeds/fresh_seeds.py OUT_DIR [OUT_DIR ...]
"""
import json, sys
from pathlib import Path
from concord.trainer.tools.compare import paired_interval, verdict

def metric(summary, task):
    e = summary["eval"][task]
    return e["ne"] if "ne" in e else e["mse"]

for out in sys.argv[1:]:
    runs = Path(out) / "runs"
    names = {p.name.rsplit("-seed", 1)[0] for p in runs.iterdir()}
    methods = sorted(m for m in names if m != "equal" and not m.startswith("single-"))  # single-: --single-task
    tasks = list(json.loads((runs / "equal-seed0/summary.json").read_text())["eval"])
    print(f"## {Path(out).name}")
    for m in methods:
        for task in tasks:
            row = []
            for seeds in (range(0, 10), range(10, 20), range(0, 20)):
                gains = []
                for s in seeds:
                    try:
                        eq = metric(json.loads((runs / f"equal-seed{s}/summary.json").read_text()), task)
                        me = metric(json.loads((runs / f"{m}-seed{s}/summary.json").read_text()), task)
                    except FileNotFoundError:
                        continue
                    gains.append((eq - me) / eq * 100)
                if len(gains) < 2:
                    row.append("-")
                    continue
                mean, lo, hi = paired_interval(gains)
                row.append(f"{mean:+.2f} [{lo:+.2f}, {hi:+.2f}] {verdict(gains)[:6]} (n={len(gains)})")
            print(f"  {m:13s} {task:14s} seeds 0-9: {row[0]:45s} seeds 10-19: {row[1]:45s} all: {row[2]}")
