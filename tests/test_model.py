"""The unsharded model: shapes through both interaction types, and the boundary in the middle."""

from __future__ import annotations

import pytest
import torch

from concord.trainer.config import load_config
from concord.trainer.data.reader import Batch
from concord.trainer.model import build_model
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor


def batch_for(cfg, rows: int) -> Batch:
    keys = [f for t in cfg.model.tables for f in t.features]
    lengths = torch.ones(len(keys) * rows, dtype=torch.int32)
    sparse = KeyedJaggedTensor.from_lengths_sync(keys, torch.zeros(len(keys) * rows, dtype=torch.int64), lengths)
    labels = torch.stack([torch.randint(0, 2, (rows,)).float(), torch.randint(0, 2, (rows,)).float(), torch.randn(rows)], 1)
    return Batch(torch.randn(rows, len(cfg.data.dense_columns)), sparse, labels, torch.ones(rows))


@pytest.mark.parametrize("overrides", [[], ["model.interaction.type=concat", "model.interaction.mlp=[24, 12]"]])
def test_forward_shapes_and_one_backward(overrides):
    cfg = load_config("configs/tiny.yaml", [*overrides, "balancer.statistics=current"])  # the step's own statistics
    torch.manual_seed(0)
    model = build_model(cfg, "cpu")
    out = model(batch_for(cfg, 10))
    assert out.logits.shape == (10, 3) and out.losses.shape == (3,)
    out.objective.backward()
    assert model.bottom.shared._mlp[0]._linear.weight.grad is not None
    assert all(h.out.weight.grad is not None for h in model.heads.heads)
    stats = model.boundary.last_stats
    assert stats is not None and stats.active.all()


def test_output_bias_labels_starts_each_head_at_its_training_labels(tmp_path):
    """Convert's record of the training labels' means where it has one; without it (Parquet written by
    other tools, synthetic data) ``labels`` reads them from the training files and ``auto`` leaves the
    heads as torch starts them."""
    import json
    import math

    import numpy as np
    import pyarrow.parquet as pq
    from tiny_data import tiny_data

    overrides = [*tiny_data(tmp_path), "model.output_bias=labels"]

    def biases(*changes):
        torch.manual_seed(0)
        return [head.out.bias.item() for head in build_model(load_config("configs/tiny.yaml", [*overrides, *changes]), "cpu").heads.heads]

    def started(ctr, cvr, watch):
        return [math.log(ctr / (1 - ctr)), math.log(cvr / (1 - cvr)), watch]

    torch_init = biases("model.output_bias=torch")
    assert biases("model.output_bias=auto") == torch_init  # no record: torch's initialisation
    training = pq.read_table(tmp_path / "data/train")
    means = [float(np.mean(training.column(f"label_{name}").to_numpy().astype(np.float64))) for name in ("ctr", "cvr", "watch")]
    assert 0 < means[1] < means[0] < 1 and biases() == pytest.approx(started(*means))  # no record: read from the data
    (tmp_path / "data/convert.json").write_text(json.dumps({"label_means": {"train": {"ctr": 0.2, "cvr": 0.0, "watch": 151.3}}}))
    at_labels = started(0.2, 1e-6, 151.3)
    assert biases() == pytest.approx(at_labels) and biases("model.output_bias=auto") == pytest.approx(at_labels)
    assert build_model(load_config("configs/tiny.yaml", overrides), "cpu").heads.started_at_labels  # the run says so
    assert not build_model(load_config("configs/tiny.yaml", [*overrides, "model.output_bias=torch"]), "cpu").heads.started_at_labels
    assert biases("model.output_bias=torch") == torch_init
    # Where the heads start does not tell a checkpoint apart: a resumed or scored run loads them.
    from concord.trainer.fingerprint import fingerprint

    assert fingerprint(load_config("configs/tiny.yaml", overrides), 1, 0) == fingerprint(load_config("configs/tiny.yaml", overrides[:-1]), 1, 0)


def test_the_trainer_lags_the_statistics_by_default_where_the_method_allows():
    modes = {}
    for name in ("multibalance", "cograd", "graddrop", "param_mgda"):
        boundary = build_model(load_config("configs/tiny.yaml", [f"balancer.name={name}"]), "cpu").boundary
        modes[name] = boundary.statistics
    assert modes == {"multibalance": "previous", "cograd": "previous", "graddrop": "current", "param_mgda": "current"}
    every = {name: build_model(load_config("configs/tiny.yaml", [f"balancer.name={name}"]), "cpu").boundary.statistics_every
             for name in ("multibalance", "emtl", "cograd", "equal")}
    assert every == {"multibalance": 10, "emtl": 10, "cograd": 10, "equal": 1}  # statistics_every: auto
    explicit = build_model(load_config("configs/tiny.yaml", ["balancer.name=multibalance", "balancer.statistics=current"]), "cpu")
    assert explicit.boundary.statistics == "current"


def test_a_task_loss_averages_weighted_row_losses_over_the_rows_and_a_missing_label_adds_nothing():
    """``sum_rows w * loss / B``: a row without the task's label (``labelled`` False) adds nothing to
    its loss or gradient, whatever its label reads; a task labelled nowhere has loss 0 and no gradient."""
    from concord.heads.heads import TaskHeads
    from concord.trainer.config import TaskConfig

    torch.manual_seed(0)
    tasks = [TaskConfig("click", "click"), TaskConfig("amount", "amount", type="regression")]
    heads = TaskHeads(4, tasks)
    z = torch.randn(6, 4, requires_grad=True)
    labels = torch.tensor([[1, 2.0], [0, -1], [1, 0.5], [0, 3], [1, 1], [0, 0]])
    weights = torch.tensor([1.0, 2.0, 0.5, 1.0, 3.0, 1.0])
    labelled = torch.tensor([[True, True], [False, True], [True, False], [True, False], [False, False], [True, True]])
    losses, logits = heads([z, z], labels, weights, labelled)
    bce = torch.nn.functional.binary_cross_entropy_with_logits(logits[:, 0], labels[:, 0], reduction="none")
    squared = (logits[:, 1] - labels[:, 1]) ** 2
    torch.testing.assert_close(losses[0], (bce * weights * labelled[:, 0]).sum() / 6)
    torch.testing.assert_close(losses[1], (squared * weights * labelled[:, 1]).sum() / 6)
    # What a missing label reads does not matter: another value there gives the same losses and gradient.
    (grad,) = torch.autograd.grad(losses.sum(), z)
    changed = labels.masked_fill(~labelled, 7.0)
    changed[:, 0] = torch.where(labelled[:, 0], labels[:, 0], 1 - labels[:, 0])
    again, _ = heads([z, z], changed, weights, labelled)
    torch.testing.assert_close(again, losses)
    torch.testing.assert_close(torch.autograd.grad(again.sum(), z)[0], grad)
    assert grad[4].abs().sum() == 0  # a row with no label for any task trains nothing
    nowhere, _ = heads([z, z], labels, weights, torch.zeros_like(labelled))
    assert nowhere.tolist() == [0.0, 0.0] and torch.autograd.grad(nowhere.sum(), z)[0].abs().sum() == 0
    # With every label present and unit weights it is the plain mean (the loss of every earlier run).
    plain, _ = heads([z, z], labels, torch.ones(6))
    torch.testing.assert_close(plain[0], bce.mean())


def test_metrics_count_a_row_only_for_the_tasks_it_has_a_label_for():
    from concord.trainer.config import TaskConfig
    from concord.trainer.observe.metrics import TaskMetrics

    torch.manual_seed(1)
    tasks = [TaskConfig("click", "click"), TaskConfig("amount", "amount", type="regression")]
    predictions = torch.stack([torch.rand(40), torch.randn(40)], 1)
    labels = torch.stack([torch.randint(0, 2, (40,)).float(), torch.randn(40)], 1)
    labelled = torch.rand(40, 2) > 0.4
    masked = TaskMetrics(tasks, 1, 0, 40)
    masked.update(predictions, labels, torch.ones(40), labelled)
    got = masked.compute()
    for k, task in enumerate(tasks):
        rows = labelled[:, k]
        alone = TaskMetrics([task], 1, 0, 40)
        alone.update(predictions[rows][:, k : k + 1], labels[rows][:, k : k + 1], torch.ones(int(rows.sum())))
        assert got[task.name] == pytest.approx(alone.compute()[task.name], rel=1e-5)


def test_figures_that_need_two_label_values_are_left_out_where_every_counted_row_holds_one():
    """torchrec reports an NE of ~10^11 and an AUC of 0.5 for held-out rows of one class, and an R² of 1
    for a constant regression label: such figures are left out, with a note saying why; labels that
    vary however little beside their size keep every figure, and a reset forgets the labels seen."""
    from concord.trainer.config import TaskConfig
    from concord.trainer.observe.metrics import TaskMetrics, compact_results, format_table, quality_notes
    from concord.trainer.tools.compare import quality

    torch.manual_seed(2)
    tasks = [TaskConfig("buy", "b"), TaskConfig("click", "c"), TaskConfig("dwell", "d", type="regression")]
    predictions = torch.stack([torch.rand(40), torch.rand(40), torch.randn(40)], 1)

    metrics = TaskMetrics(tasks, 1, 0, 40)

    def figures(buy: float, dwell: torch.Tensor) -> dict:
        metrics.reset()
        labels = torch.stack([torch.full((40,), buy), torch.randint(0, 2, (40,)).float(), dwell], 1)
        metrics.update(predictions, labels, torch.rand(40) + 0.5)  # weighted rows: the means are not counts
        return metrics.compute()

    one_value = figures(1.0, torch.full((40,), 7.3))
    assert set(one_value["buy"]) == {"calibration", "label_mean"} and one_value["buy"]["label_mean"] == 1.0
    assert set(one_value["click"]) == {"ne", "auc", "calibration", "label_mean"}
    assert set(one_value["dwell"]) == {"mse", "label_mean"} and one_value["dwell"]["label_mean"] == pytest.approx(7.3)
    assert set(figures(0.0, torch.randn(40))["buy"]) == {"label_mean"}  # calibration divides by the positives too
    varied = figures(1.0, 1e6 + torch.randn(40))["dwell"]  # a spread of 1e-12 of the mean square: two values all the same
    assert set(varied) == {"mse", "r_squared", "label_mean"}

    assert quality(one_value, tasks[0]) is None and quality(one_value, tasks[2]) == one_value["dwell"]["mse"]
    assert compact_results(one_value, tasks).startswith("buy NE - AUC -, click NE ")
    assert compact_results(one_value, tasks).endswith(f"dwell MSE {one_value['dwell']['mse']:.4f} R2 -")
    assert format_table(one_value, tasks).splitlines()[1].split() == ["buy", "binary", "-", "-", f"{one_value['buy']['calibration']:.4f}", "-", "-"]
    assert [note for note in quality_notes(one_value, tasks) if "'click'" not in note] == [  # click's: random predictions
        "note: task 'buy': every held-out row it counts is positive (label 1): NE and AUC need both classes; the table "
        "shows neither",
        "note: task 'dwell': every held-out row it counts has the label 7.3: R2 needs labels that vary; the table shows "
        "the MSE alone"]
    assert quality_notes({"buy": {"label_mean": 0.0}}, tasks[:1]) == [
        "note: task 'buy': every held-out row it counts is negative (label 0): NE and AUC need both classes, calibration "
        "a positive; the table shows none of them"]


def _one_value_on_ranks(rank: int, world_size: int) -> dict:
    import torch.distributed as dist

    from concord.trainer.config import TaskConfig
    from concord.trainer.observe.metrics import TaskMetrics

    dist.init_process_group("gloo")
    tasks = [TaskConfig("buy", "b"), TaskConfig("dwell", "d", type="regression"), TaskConfig("stay", "s", type="regression")]
    metrics = TaskMetrics(tasks, world_size, rank, 8, group=dist.group.WORLD)
    # buy: all positive on rank 0, all negative on rank 1; dwell: 7.3 on both; stay: 7.3 on rank 0, 7.4 on rank 1
    labels = torch.tensor([[1.0 - rank, 7.3, 7.3 + 0.1 * rank]]).repeat(8, 1)
    metrics.update(torch.rand(8, 3), labels, torch.ones(8))
    return metrics.compute()


@pytest.mark.multiprocess
def test_one_label_value_is_one_over_every_ranks_rows():
    """A task is of one label value only where every rank's counted rows are: ranks of one class each
    make two classes together."""
    from distributed import run_ranks

    results, _ = run_ranks(_one_value_on_ranks, 2)
    assert {"ne", "auc", "calibration"} <= set(results["buy"]) and results["buy"]["label_mean"] == 0.5
    assert "r_squared" not in results["dwell"] and "r_squared" in results["stay"]


def test_an_exact_auc_larger_than_half_a_ranks_memory_is_named_before_the_work(monkeypatch):
    """The held-out split's (or the scored data's) exact AUC is held whole on each rank: where it would
    take more than half of the rank's memory (its share of the host's, or its GPU's), a warning says so
    before training or scoring, rather than an evaluation failing after them."""
    import concord.embeddings.sharding as sharding
    from concord.trainer.observe.metrics import AUC_BYTES_PER_ROW, auc_memory_note

    monkeypatch.setattr(sharding, "host_memory_bytes", lambda: 64 * 2**30)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")  # 8 GiB a rank
    fits = 4 * 2**30 // (2 * AUC_BYTES_PER_ROW)  # two binary tasks: half of the rank's share
    assert auc_memory_note(fits, 2, torch.device("cpu"), "data.eval x") is None
    note = auc_memory_note(fits + 1, 2, torch.device("cpu"), "data.eval x")
    assert note.startswith(f"data.eval x: the exact AUC of its {fits + 1:,} rows and 2 binary task(s) holds ~4.0 GiB on each rank")
    assert note.endswith("more than half of its share of the host's memory (8.0 GiB): score a sample of these rows (README, 'Metrics')")
    assert auc_memory_note(10**9, 0, torch.device("cpu"), "x") is None  # no binary task: no AUC
    monkeypatch.setattr(sharding, "host_memory_bytes", lambda: None)
    assert auc_memory_note(10**9, 2, torch.device("cpu"), "x") is None  # unknown: no guess
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: type("Props", (), {"total_memory": 80 * 2**30})())
    assert "more than half of its GPU's memory (80.0 GiB)" in auc_memory_note(10**9, 1, torch.device("cuda", 0), "x")


def test_the_results_table_keeps_long_task_names_apart_from_their_type():
    from concord.trainer.config import TaskConfig
    from concord.trainer.observe.metrics import format_table

    tasks = [TaskConfig("vehicle_search", "v"), TaskConfig("a_task_named_at_length", "w", type="regression")]
    results = {"vehicle_search": {"ne": 0.9, "auc": 0.75, "calibration": 1.1},
               "a_task_named_at_length": {"mse": 2.0, "r_squared": 0.25}}
    rows = [line.split() for line in format_table(results, tasks).splitlines()[1:]]
    assert rows == [["vehicle_search", "binary", "0.9000", "0.7500", "1.1000", "-", "-"],
                    ["a_task_named_at_length", "regression", "-", "-", "-", "2.0000", "0.2500"]]
    assert format_table(results, tasks, "w").splitlines()[-1] == "(every figure weighs each row by its 'w', data.weight_column)"


def test_the_summary_notes_a_task_no_better_than_its_base_rate_and_gradients_ten_times_apart():
    from concord.trainer.config import TaskConfig
    from concord.trainer.observe.metrics import quality_notes

    tasks = [TaskConfig("good", "g"), TaskConfig("excellent", "e"), TaskConfig("rating", "r", type="regression")]
    results = {"good": {"ne": 0.95}, "excellent": {"ne": 1.0311}, "rating": {"mse": 1.47}}
    starved = quality_notes(results, tasks, {"good": 0.008, "excellent": 0.004, "rating": 0.048})
    assert starved == ["note: task 'excellent' predicts the held-out rows no better than its base rate (NE 1.0311 >= 1); its "
                       "gradient at z averaged 12x smaller than that of 'rating'; `--single-task excellent` tells whether the "
                       "other tasks starve it (README, 'Which balancer to try first')"]
    assert "averaged" not in quality_notes(results, tasks, {"good": 0.008, "excellent": 0.008, "rating": 0.048})[0]
    assert quality_notes(results, tasks[1:2]) == ["note: task 'excellent' predicts the held-out rows no better than its "
                                                  "base rate (NE 1.0311 >= 1)"]  # alone: nothing else to starve it
    assert quality_notes({"good": {"ne": 0.95}}, tasks[:2]) == [  # a masked task none of whose held-out rows is labelled
        "note: task 'excellent' has no held-out figures: no held-out row holds its label with a weight above 0"]

    unlearned = {"good": {"ne": 0.95}, "excellent": {"ne": 0.97}, "rating": {"mse": 1.47, "r_squared": -0.0213}}
    assert quality_notes(unlearned, tasks, {"good": 0.048, "excellent": 0.05, "rating": 0.004}) == [
        "note: task 'rating' predicts the held-out rows no better than their mean label (R2 -0.0213 <= 0); if its labels "
        "lie far from 0, model.output_bias: labels starts its head at their mean; its gradient at z averaged 12x smaller "
        "than that of 'excellent'; `--single-task rating` tells whether the other tasks starve it (README, 'Which balancer "
        "to try first')"]
    started = quality_notes(unlearned, tasks[2:], heads_at_labels=True)
    assert started == ["note: task 'rating' predicts the held-out rows no better than their mean label (R2 -0.0213 <= 0)"]

    learned = {"good": {"ne": 0.9}, "excellent": {"ne": 0.92}, "rating": {"mse": 1.4, "r_squared": 0.3}}
    apart = {"good": 0.01, "excellent": 0.004, "rating": 0.048}
    assert quality_notes(learned, tasks, apart) == [
        "note: the tasks' gradients at z averaged up to 12x apart ('rating' over 'excellent'): one task steers the "
        "shared layers; README, 'Which balancer to try first'"]
    assert quality_notes(learned, tasks, apart, balancer="multibalance") == []  # a balancer is already at work
    assert quality_notes(learned, tasks, {"good": 0.01, "excellent": 0.008, "rating": 0.048}) == []
    assert quality_notes(learned, tasks) == []


def test_a_note_on_a_task_no_better_than_its_mean_says_when_the_held_out_labels_moved_from_trainings():
    import math

    from concord.trainer.config import TaskConfig
    from concord.trainer.observe.metrics import quality_notes

    tasks = [TaskConfig("liked", "l"), TaskConfig("rating", "r", type="regression")]
    # Held out: positive rate 0.35 and mean rating 6.27 with variance 2.6128 / (1 + 0.008); training: 0.24 and 5.855.
    results = {"liked": {"ne": 1.0631, "label_mean": 0.35}, "rating": {"mse": 2.6128, "r_squared": -0.008, "label_mean": 6.27}}
    notes = quality_notes(results, tasks, heads_at_labels=True, training_means={"liked": 0.24, "rating": 5.855})
    p, q = 0.35, 0.24
    ne = (p * math.log(q) + (1 - p) * math.log(1 - q)) / (p * math.log(p) + (1 - p) * math.log(1 - p))
    r2 = -(6.27 - 5.855) ** 2 / (2.6128 / 1.008)
    assert f"its held-out positive rate 0.35 differs from training's 0.24 (training's, predicted for every row, scores NE {ne:.4f}" in notes[0]
    assert f"its held-out mean label 6.27 differs from training's 5.855 (training's, predicted for every row, scores R2 {r2:.4f}" in notes[1]
    # Labels that did not move, or moved too little to cost 0.01 of NE or R2, are not named.
    for near in ({"liked": 0.35, "rating": 6.27}, {"liked": 0.34, "rating": 6.2}):
        assert all("differs" not in note for note in quality_notes(results, tasks, heads_at_labels=True, training_means=near))


def test_a_regression_tasks_r2_is_one_less_its_weighted_mse_over_the_labels_weighted_variance():
    from concord.trainer.config import TaskConfig
    from concord.trainer.observe.metrics import TaskMetrics

    torch.manual_seed(2)
    labels, weights = 150 + 80 * torch.randn(64, 1, dtype=torch.float64), torch.rand(64, dtype=torch.float64)
    mean = (weights * labels[:, 0]).sum() / weights.sum()
    variance = (weights * (labels[:, 0] - mean) ** 2).sum() / weights.sum()
    for predictions in (labels + 20 * torch.randn(64, 1, dtype=torch.float64), torch.full_like(labels, float(mean))):
        metrics = TaskMetrics([TaskConfig("watch", "watch", type="regression")], 1, 0, 64)
        metrics.update(predictions.float(), labels.float(), weights.float())
        mse = (weights * (predictions[:, 0] - labels.float()[:, 0].double()) ** 2).sum() / weights.sum()
        got = metrics.compute()["watch"]
        assert got["mse"] == pytest.approx(float(mse), rel=1e-5)
        assert got["r_squared"] == pytest.approx(float(1 - mse / variance), rel=1e-5, abs=1e-5)
        assert got["label_mean"] == pytest.approx(float(mean), rel=1e-6)
    assert abs(got["r_squared"]) < 1e-5  # the weighted mean label predicted: 0


def test_the_held_out_label_mean_counts_only_the_rows_a_task_has_a_label_for():
    from concord.trainer.config import TaskConfig
    from concord.trainer.observe.metrics import TaskMetrics

    labels = torch.tensor([[1.0, 2.0], [0.0, float("nan")], [1.0, 4.0], [1.0, float("nan")]])  # a masked label is NaN
    labelled = ~labels.isnan()
    weights = torch.tensor([1.0, 3.0, 1.0, 0.0])  # the last row is padding
    metrics = TaskMetrics([TaskConfig("click", "click"), TaskConfig("spend", "spend", type="regression")], 1, 0, 4)
    metrics.update(torch.full((4, 2), 0.5), labels, weights, labelled)
    got = metrics.compute()
    assert got["click"]["label_mean"] == pytest.approx(2 / 5)  # (1 + 0 * 3 + 1) / 5
    assert got["spend"]["label_mean"] == pytest.approx(3.0)  # rows 0 and 2 only


def test_a_task_no_row_was_labelled_for_has_no_metrics_rather_than_a_perfect_score():
    from concord.trainer.config import TaskConfig
    from concord.trainer.observe.metrics import TaskMetrics

    tasks = [TaskConfig("click", "click"), TaskConfig("amount", "amount", type="regression"), TaskConfig("buy", "buy")]
    metrics = TaskMetrics(tasks, 1, 0, 8)
    labelled = torch.tensor([[True, False, False]] * 8)
    metrics.update(torch.rand(8, 3), torch.randint(0, 2, (8, 3)).float(), torch.ones(8), labelled)
    assert set(metrics.compute()) == {"click"}  # torchrec alone reports amount's MSE as 0.0
    metrics.reset()
    metrics.update(torch.rand(8, 3), torch.randint(0, 2, (8, 3)).float(), torch.ones(8))
    assert set(metrics.compute()) == {"click", "amount", "buy"}
