"""``concord plot RUN_DIR``: the MultiBalance paper's Figure 2(c)-(e) from a run's JSONL log.

(c) raw gradient magnitude per task at the boundary, (d) learned task weights, (e) weighted gradient
magnitudes (weight x rescaled norm for MultiBalance, weight x raw norm otherwise), over training steps.
"""

from __future__ import annotations

from pathlib import Path
from typing import Dict, List

from concord.trainer.observe.runlog import read_records


def _train_records(run_dir: Path) -> List[dict]:
    train = [r for r in read_records(run_dir) if r.get("kind") == "train" and r.get("balancer")]
    if not train:
        raise ValueError(f"{run_dir / 'metrics.jsonl'}: no training records with balancer telemetry to plot")
    return train


def _series(records: List[dict], key: str) -> Dict[str, List[float]]:
    out: Dict[str, List[float]] = {}
    for r in records:
        for task, value in r["balancer"].get(key, {}).items():
            out.setdefault(task, []).append(value)
    return out


def plot_run(run_dir: str | Path) -> List[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    run_dir = Path(run_dir)
    records = _train_records(run_dir)
    steps = [r["step"] for r in records]
    norms, weights = _series(records, "grad_norm"), _series(records, "weights")
    weighted = _series(records, "weighted_grad_norm") or {
        t: [w * n for w, n in zip(weights[t], norms[t])] for t in weights if t in norms
    }
    method = records[-1].get("balancer_name") or _method_from_config(run_dir)
    panels = [
        ("(c) raw gradient magnitude at z", norms, True),
        ("(d) learned task weights", weights, False),
        ("(e) weighted gradient magnitude", weighted, True),
    ]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for ax, (title, series, log_scale) in zip(axes, panels):
        for task, values in series.items():
            ax.plot(steps[: len(values)], values, label=task)
        ax.set_title(title)
        ax.set_xlabel("step")
        if not series:  # a method that logs no such figure (a parameter-level one has no weights at z)
            ax.text(0.5, 0.5, "not logged by this method", ha="center", va="center", transform=ax.transAxes)
            continue
        if log_scale:
            ax.set_yscale("log")
        ax.legend()
    fig.suptitle(f"{run_dir.name}: balancer {method}")
    fig.tight_layout()
    out_dir = run_dir / "plots"
    out_dir.mkdir(exist_ok=True)
    path = out_dir / "balancer.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return [path]


def _method_from_config(run_dir: Path) -> str:
    import yaml

    cfg = run_dir / "config.yaml"
    return yaml.safe_load(cfg.read_text())["balancer"]["name"] if cfg.is_file() else "?"
