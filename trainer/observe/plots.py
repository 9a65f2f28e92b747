"""``concord plot RUN_DIR``: the MultiBalance paper's Figure 2(c)-(e) from a run's JSONL log.

(c) raw gradient magnitude per task at the boundary, (d) learned task weights, (e) weighted gradient
magnitudes (weight x rescaled norm for MultiBalance, weight x raw norm otherwise), over training steps;
for a rule that corrects the gradient element by element (CoGrad), whose weights stay put, (f) the
correction's size and, with its guard, what it costs each task.
"""

from __future__ import annotations

from pathlib import Path
from typing import Dict, List, Tuple

from concord.trainer.observe.runlog import read_records


def _train_records(run_dir: Path) -> List[dict]:
    train = [r for r in read_records(run_dir) if r.get("kind") == "train" and r.get("balancer")]
    if not train:
        raise ValueError(f"{run_dir / 'metrics.jsonl'}: no training records with balancer telemetry to plot")
    return train


def _series(records: List[dict], key: str, order: List[str]) -> Dict[str, Tuple[List[int], List[float]]]:
    """Each task's (steps, values) of one telemetry key, tasks in ``order`` (the config's) and then any
    other: a task missing from some records (an absent task) keeps its values at their own steps."""
    out: Dict[str, Tuple[List[int], List[float]]] = {}
    for r in records:
        for task, value in r["balancer"].get(key, {}).items():
            steps, values = out.setdefault(task, ([], []))
            steps.append(r["step"])
            values.append(value)
    rank = {task: i for i, task in enumerate(order)}
    return dict(sorted(out.items(), key=lambda item: rank.get(item[0], len(rank))))


def figure_series(run_dir: Path) -> Tuple[str, List[Tuple[str, Dict[str, Tuple[List[int], List[float]]], bool]]]:
    """The run's method and the three panels: title, each task's series, and whether on a log scale:
    (c) raw gradient magnitude, (d) weights, (e) weighted magnitude (MultiBalance logs its own, of the
    rescaled norms; else weight x raw norm at the steps that log both)."""
    records, config = _train_records(run_dir), _config(run_dir)
    order = config.get("tasks_order", [])
    norms, weights = _series(records, "grad_norm", order), _series(records, "weights", order)
    weighted = _series(records, "weighted_grad_norm", order)
    if not weighted:
        for task, (steps, values) in weights.items():
            norm_at = dict(zip(*norms.get(task, ([], []))))
            kept = [(s, w * norm_at[s]) for s, w in zip(steps, values) if s in norm_at]
            weighted[task] = ([s for s, _ in kept], [v for _, v in kept])
    method = records[-1].get("balancer_name") or config.get("method", "?")
    panels = [("(c) raw gradient magnitude at z", norms, True), ("(d) learned task weights", weights, False),
              ("(e) weighted gradient magnitude", weighted, True)]
    correction = _correction_series(records, order)
    if correction:
        panels.append(("(f) correction ||A - P|| / ||P||; its cost to each task", correction, False))
    return method, panels


def _correction_series(records: List[dict], order: List[str]) -> Dict[str, Tuple[List[int], List[float]]]:
    """CoGrad's logged ``correction_ratio`` (the aggregate's), and with its guard each task's
    ``correction_cost`` (the share of its own first-order gain the correction takes); {} where the
    method logs neither."""
    ratio = [(r["step"], r["balancer"]["correction_ratio"]) for r in records if "correction_ratio" in r["balancer"]]
    if not ratio:
        return {}
    out = {"||A - P|| / ||P||": ([s for s, _ in ratio], [v for _, v in ratio])}
    for task, series in _series(records, "correction_cost", order).items():
        out[f"cost to {task}"] = series
    return out


def plot_run(run_dir: str | Path) -> List[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    run_dir = Path(run_dir)
    method, panels = figure_series(run_dir)
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4))
    for ax, (title, series, log_scale) in zip(axes, panels):
        for task, (steps, values) in series.items():
            ax.plot(steps, values, label=task)
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


def _config(run_dir: Path) -> dict:
    """The run's method and its tasks in the config's order, from its ``config.yaml``; {} without one."""
    import yaml

    cfg = run_dir / "config.yaml"
    if not cfg.is_file():
        return {}
    raw = yaml.safe_load(cfg.read_text()) or {}
    return {"method": (raw.get("balancer") or {}).get("name", "?"),
            "tasks_order": [t["name"] for t in raw.get("tasks") or [] if isinstance(t, dict) and "name" in t]}
