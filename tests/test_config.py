"""Config validation: every error names the file and the key."""

from __future__ import annotations

import platform
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from concord.trainer.config import ConfigError, load_config
from concord.trainer.config_checks import check_machine

DEMO = "configs/demo.yaml"


def with_change(tmp_path, edit):
    raw = yaml.safe_load(open(DEMO))
    edit(raw)
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(raw))
    return str(path)


def test_shipped_configs_load():
    shipped = sorted(Path("configs").glob("*.yaml"))
    assert len(shipped) >= 6
    for path in shipped:
        cfg = load_config(str(path))
        assert cfg.task_names and cfg.model.tables, path


def test_overrides_apply_with_types():
    cfg = load_config(DEMO, ["train.max_steps=7", "tasks.1.loss_weight=2.5", "balancer.name=emtl", "balancer.beta=0.3"])
    assert cfg.train.max_steps == 7 and cfg.tasks[1].loss_weight == 2.5
    assert cfg.balancer.name == "emtl" and cfg.balancer.knobs == {"beta": 0.3}
    # A list entry may be named as errors and resume refusals name it: model.tables[1].embedding_dim.
    cfg = load_config(DEMO, ["tasks[0].head=[8]", "model.tables[1].embedding_dim=16"])
    assert cfg.tasks[0].head == [8] and cfg.model.tables[1].embedding_dim == 16


def test_a_partial_mapping_keeps_the_other_defaults():
    cfg = load_config("configs/tiny.yaml", ["train.dense_optimizer.lr=0.01", "model.experts.type=ple"])
    assert (cfg.train.dense_optimizer.name, cfg.train.dense_optimizer.lr) == ("adam", 0.01)
    assert cfg.model.experts.num_shared == 4 and cfg.representation_dim == 64


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda r: r["train"].update(bogus=1), r"c\.yaml: train\.bogus: unknown key"),
        (lambda r: r["data"].update(batch_size="big"), r"c\.yaml: data\.batch_size: expected an integer, got 'big'"),
        (lambda r: r["model"]["tables"][0].update(features=[]), r"model\.tables\[0\]\.features: table 't_user' has no features"),
        (lambda r: r["data"]["sparse_columns"].update(orphan="orphan"), r"data\.sparse_columns\.orphan: feature 'orphan' is not read by any table"),
        (lambda r: r["model"]["tables"][1]["features"].append("ghost"), r"model\.tables\[1\]\.features: feature 'ghost' has no column"),
        (lambda r: r["tasks"][0].update(type="ranking"), r"tasks\[0\]\.type: must be one of 'binary', 'regression', got 'ranking'"),
        (lambda r: r["tasks"][1].update(name=r["tasks"][0]["name"]), r"tasks\[1\]\.name: task name 'ctr' is used twice \(tasks\[0\] has it too\)"),
        (lambda r: r.update(balancer={"name": "emtl", "rho": 5.0}), r"balancer: emtl\.rho = 5\.0 must be < log T"),
        (lambda r: r.update(balancer={"name": "multibalance", "speed": 1}), r"balancer: balancer 'multibalance' has no knob 'speed'"),
        (lambda r: r["model"]["tables"][0].update(embedding_dim=30), r"embedding_dim: must be a positive multiple of 4"),
        (lambda r: r.pop("tasks"), r"c\.yaml: tasks: required key is missing"),
        (lambda r: r["data"].update(on_bad_id="drop"), r"data\.on_bad_id: must be 'error' or 'hash', got 'drop'"),
        (lambda r: r["train"].update(on_nonfinite="ignore"), r"train\.on_nonfinite: must be 'abort' or 'skip'"),
        (lambda r: r["train"].update(keep_checkpoints=0), r"train\.keep_checkpoints: must be >= 1"),
        (lambda r: r["model"].update(experts={"type": "moe"}), r"model\.experts\.type: must be none, mmoe or ple, got 'moe'"),
        (lambda r: r["model"].update(experts={"type": "ple", "num_task": 0}), r"model\.experts\.num_task: must be >= 1 for ple"),
        (lambda r: r["model"].update(shared=[]), r"model\.shared: needs at least one layer"),
        (lambda r: r["data"].update(train=" "), r"data\.train: is empty: give a folder, a file or a glob$"),
        (lambda r: r["data"].update(eval=""), r"data\.eval: is empty: give a folder, a file or a glob, or leave it out$"),
        (lambda r: r["model"].update(output_bias="mean"), r"model\.output_bias: must be one of \('auto', 'labels', 'torch'\), got 'mean'"),
        (lambda r: r["data"]["dense_columns"].append("dense_3"),
         r"data\.dense_columns\[8\]: 'dense_3' is listed twice \(data\.dense_columns\[3\] has it too\)"),
        (lambda r: r["data"]["dense_columns"].append(r["tasks"][2]["label"]),
         r"data\.dense_columns\[8\]: 'label_watch_time' is the label column of task 'watch_time': the model would read the label it predicts"),
        (lambda r: r["data"]["sparse_columns"].update(context=r["tasks"][1]["label"]),
         r"data\.sparse_columns\.context: 'label_cvr' is the label column of task 'cvr': the model would read the label it predicts"),
        # synth (and convert) write each split's folder anew: two splits in one folder would lose one
        (lambda r: r["data"].update(eval=r["data"]["train"]), r"data\.eval: .* is data\.train's folder \(.*\); each split is written to a folder of its own"),
        (lambda r: r["data"].update(validation=r["data"]["train"] + "/v"), r"data\.validation: .*/v lies inside data\.train's folder"),
        (lambda r: r["data"].update(train=r["data"]["eval"] + "/.."), r"data\.eval: .* lies inside data\.train's folder"),
    ],
)
def test_errors_name_the_file_and_key(tmp_path, edit, message):
    with pytest.raises(ConfigError, match=message):
        load_config(with_change(tmp_path, edit))


def test_without_dense_columns_the_default_dense_mlp_is_none_and_one_set_is_an_error(tmp_path):
    def no_dense(raw, dense_mlp=None):
        raw["data"]["dense_columns"] = []
        raw["data"].pop("convert", None)
        raw["model"].pop("dense_mlp", None)
        if dense_mlp is not None:
            raw["model"]["dense_mlp"] = dense_mlp

    assert load_config(with_change(tmp_path, no_dense)).model.dense_mlp == []
    with pytest.raises(ConfigError, match=r"data\.dense_columns: model\.dense_mlp is set but there are no dense columns"):
        load_config(with_change(tmp_path, lambda r: no_dense(r, [16])))
    with_default = load_config(with_change(tmp_path, lambda r: r["model"].pop("dense_mlp")))
    assert with_default.model.dense_mlp == [128, 64]  # with dense columns the default MLP stays


def test_bad_override_names_the_key():
    with pytest.raises(ConfigError, match=r"override tasks\.9\.name: '9' is not an index"):
        load_config(DEMO, ["tasks.9.name=x"])


def test_overrides_may_sit_on_either_side_of_the_options_and_keep_their_order(capsys):
    from concord.trainer.cli import _parse

    args = _parse(["compare", "--config", "adult", "model.shared=[]", "--methods", "equal", "model.shared=[8]", "--out", "x"])
    assert args.overrides == ["model.shared=[]", "model.shared=[8]"] and args.methods == "equal"  # the last one wins
    for argv, stray in ((["train", "--config", "x", "--bogus"], "--bogus"), (["plot", "runs/x", "a=1"], "a=1")):
        with pytest.raises(SystemExit):
            _parse(argv)
        assert f"unrecognized arguments: {stray}" in capsys.readouterr().err


def test_scoring_without_a_config_reads_the_runs_own(tmp_path):
    """`concord predict --checkpoint RUN` read the demo's config, whose model and data are not the
    run's; without --config it now reads the one the run recorded, RUN/config.yaml (the demo where
    there is none). The other commands keep the demo as their default."""
    from concord.trainer.cli import _parse

    predict = ["predict", "--checkpoint", str(tmp_path), "--out", "p.parquet"]
    assert _parse(predict).config == "demo"
    (tmp_path / "config.yaml").write_text("{}\n")
    assert _parse(predict).config == str(tmp_path / "config.yaml")
    assert _parse([*predict, "--config", "adult"]).config == "adult"
    assert _parse(["train"]).config == "demo" and _parse(["compare", "--out", "x"]).config == "demo"


def test_single_task_keeps_that_task_with_equal_and_names_a_wrong_one():
    cfg = load_config("configs/tiny.yaml", ["balancer.name=emtl"], single_task="cvr")
    assert cfg.task_names == ["cvr"] and cfg.balancer.name == "equal"
    with pytest.raises(ConfigError, match=r"--single-task ctcvr: no such task \(tasks: ctr, cvr, watch\)"):
        load_config("configs/tiny.yaml", single_task="ctcvr")
    converted = load_config("configs/aliccp.yaml", single_task="ctcvr")
    assert converted.data.convert.labels == {"purchase": "purchase"}


@pytest.mark.parametrize("override, message", [
    ("data.convert.categorical.0.feature=account", r"data\.convert\.categorical\[0\]\.feature: 'account' is not a key of data\.sparse_columns"),
    ("data.convert.dense=[]", r"data\.convert\.dense: no rule produces dense column 'price'"),
    ("data.convert.split={by: time}", r"data\.convert\.split\.column: a time split needs the time column"),
    ("data.convert.on_bad_row=drop", r"data\.convert\.on_bad_row: must be 'error' or 'skip'"),
    ("data.convert.labels={clicked: click}", r"data\.convert\.labels\.clicked: 'clicked' is not the label column of any task"),
    ("data.convert.dense.1.column=purchase",
     r"data\.convert\.dense\[1\]\.column: 'purchase' is the input column of the label of task 'ctcvr': the model would read the label it predicts"),
    ("data.convert.categorical.0.column=click",
     r"data\.convert\.categorical\[0\]\.column: 'click' is the input column of the label of task 'ctr': the model would read"),
])
def test_convert_rules_must_produce_exactly_what_the_trainer_reads(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config("configs/aliccp.yaml", [override])


@pytest.mark.parametrize("rule", ["positive={click: ['1']}", "positive_range={click: {at_least: 1}}", "unknown={click: [-1]}"])
def test_a_label_rule_keyed_by_its_input_column_names_the_key_to_use(rule):
    """A label rule is keyed by the task's label column; a user who renamed the label (``labels:
    {clicked: click}``) and keyed the rule by the input column is told which key to use."""
    renamed = ["tasks.0.label=clicked", "tasks.0.missing_label=masked", "data.convert.labels={clicked: click, purchase: purchase}"]
    with pytest.raises(ConfigError, match=r"data\.convert\.\w+\.click: 'click' is not the label column of any task \(they are "
                                          r"'clicked', 'purchase'\); it is the input column that data\.convert\.labels reads "
                                          r"'clicked' from: key the rule by 'clicked'$"):
        load_config("configs/aliccp.yaml", [*renamed, f"data.convert.{rule}"])


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="checks what a machine without a GPU refuses")
@pytest.mark.parametrize("override,message", [
    ("dist.device=cuda", r"dist\.device: cuda, but this machine has no usable GPU"),
    ("dist.backend=nccl", r"dist\.backend: nccl needs CUDA devices; on CPU use gloo"),
    ("model.tables.0.sharding_types=[row_wise]", r"model\.tables\[0\]\.sharding_types: 'row_wise' needs CUDA"),
])
def test_what_this_machine_cannot_run_is_a_config_error(override, message):
    from concord.trainer.config_checks import check_machine

    cfg = load_config("configs/tiny.yaml", [override, "dist.device=auto"] if "device" not in override else [override])
    with pytest.raises(ConfigError, match=message):
        check_machine(cfg)


def test_the_torchx_component_refuses_cuda_without_gpus(tmp_path, monkeypatch):
    """Asked for in an override or in the config file (where it can be read before launch)."""
    from concord.launch.components import train

    monkeypatch.setenv("PATH", str(Path(sys.executable).parent))  # torchrun, as in an activated environment

    with pytest.raises(ValueError, match="the overrides: dist.device=cuda needs GPUs"):
        train("dist.device=cuda", gpu=0)
    config = tmp_path / "gpu.yaml"
    raw = yaml.safe_load(open("configs/tiny.yaml"))
    raw["dist"]["device"] = "cuda"
    config.write_text(yaml.safe_dump(raw))
    with pytest.raises(ValueError, match=f"{config}: dist.device: dist.device=cuda needs GPUs"):
        train(config=str(config), gpu=0)
    assert train(config=str(config), gpu=1, j="1x1").roles[0].resource.gpu == 1
    train("dist.device=cpu", config=str(config), gpu=0)  # the override wins


def test_the_torchx_component_says_to_activate_the_environment_where_torchrun_is_not_on_path(tmp_path, monkeypatch):
    """`.venv/bin/torchx run ...` from a shell that had not activated the environment started a job
    that failed on bash's "torchrun: command not found"; with an image, the image's PATH counts."""
    from concord.launch.components import train

    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(ValueError, match=re.escape("torchrun is not on PATH, and the job runs it on every node: activate "
                                                   f"the environment Concord is installed in first (`source {Path(sys.executable).parent / 'activate'}`)")):
        train(config="configs/tiny.yaml")
    assert train(config="configs/tiny.yaml", image="registry/concord:1").roles[0].image == "registry/concord:1"


def test_a_yaml_mistake_is_one_line_with_its_place(tmp_path):
    """PyYAML's message spread over five lines, the text quoted under a caret; the standard is one line
    naming the place."""
    bad = tmp_path / "bad.yaml"
    bad.write_text("data:\n  train: x\n   eval: y\n")
    with pytest.raises(ConfigError) as refused:
        load_config(bad)
    assert str(refused.value) == f"{bad}: not valid YAML: mapping values are not allowed here at line 3, column 8"
    bad.write_text("data: [1, 2\n")
    with pytest.raises(ConfigError, match=r"not valid YAML: expected ',' or '\]', but got '<stream end>' at line 2, column 1 "
                                          r"\(while parsing a flow sequence\)$"):
        load_config(bad)


def test_a_whole_number_written_as_1e5_is_an_integer_and_a_folder_is_not_a_config(tmp_path):
    assert load_config(DEMO, ["train.max_steps=1e5", "data.synthetic.rows=2.0e6"]).train.max_steps == 100_000
    with pytest.raises(ConfigError, match=r"train\.max_steps: expected an integer, got 2\.5"):
        load_config(DEMO, ["train.max_steps=2.5"])
    (tmp_path / "config.yaml").write_text(open(DEMO).read())  # a run directory
    with pytest.raises(ConfigError, match=re.escape(f"{tmp_path}: is a folder, not a config file; the run's config is {tmp_path / 'config.yaml'}")):
        load_config(tmp_path)


def test_single_task_drops_the_other_tasks_label_rules():
    cfg = load_config("configs/adult.yaml", single_task="income")
    assert cfg.task_names == ["income"]
    assert cfg.data.convert.labels == {"income": "income"} and cfg.data.convert.positive == {"income": [">50K"]}
    ranges = ["data.convert.positive_range.late.at_least=1", "data.convert.positive_range.early.at_least=1"]
    assert list(load_config("configs/flights.yaml", ranges, single_task="early").data.convert.positive_range) == ["early"]
    assert load_config("configs/crashes.yaml", single_task="dead").data.convert.unknown == {}  # serious's, gone with it
    assert load_config("configs/crashes.yaml", single_task="serious").data.convert.unknown == {"serious": [5, 6]}


def test_checking_a_config_imports_no_dynamo():
    """`concord train` checks its config in a launcher before torchrun starts, for every run and every
    cell of `compare` and `tune`: the balancer's settings are checked without building a boundary,
    whose first construction marks it to run eagerly under torch.compile and so imports Dynamo (about
    a second there for nothing)."""
    code = ("import sys; from concord.trainer.config import load_config; "
            "load_config('configs/tiny.yaml', ['balancer.name=multibalance']); print('torch._dynamo' in sys.modules)")
    checked = subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).resolve().parents[1], capture_output=True,
                             text=True, timeout=300)
    assert checked.returncode == 0 and checked.stdout.split() == ["False"], checked.stderr[-2000:]


def test_lagged_statistics_are_a_balancer_setting_and_graddrop_cannot_lag():
    assert load_config("configs/tiny.yaml").balancer.statistics == "auto"  # lagged wherever the method allows
    assert load_config("configs/tiny.yaml", ["balancer.name=graddrop"]).balancer.statistics == "auto"  # current for it
    with pytest.raises(ConfigError, match="graddrop needs each step's own statistics; use statistics_every=1"):
        load_config("configs/tiny.yaml", ["balancer.name=graddrop", "balancer.statistics_every=10"])
    cfg = load_config("configs/tiny.yaml", ["balancer.name=multibalance", "balancer.statistics=previous"])
    assert cfg.balancer.statistics == "previous" and cfg.balancer.knobs == {}
    with pytest.raises(ConfigError, match="graddrop needs each step's own statistics"):
        load_config("configs/tiny.yaml", ["balancer.name=graddrop", "balancer.statistics=previous"])
    cfg = load_config("configs/tiny.yaml", ["balancer.name=multibalance", "balancer.statistics=previous", "balancer.statistics_every=10"])
    assert cfg.balancer.statistics_every == 10 and cfg.balancer.knobs == {}
    with pytest.raises(ConfigError, match="statistics_every must be 'auto', 1, or > 1 with statistics='previous' or 'auto'"):
        load_config("configs/tiny.yaml", ["balancer.name=multibalance", "balancer.statistics=current", "balancer.statistics_every=10"])
    assert load_config("configs/tiny.yaml").balancer.statistics_every == "auto"  # the method's own cadence
    for bad in ("0", "often", "2.5"):
        with pytest.raises(ConfigError, match=r"tiny.yaml: balancer.statistics_every: must be 'auto' or a whole number of steps >= 1"):
            load_config("configs/tiny.yaml", [f"balancer.statistics_every={bad}"])


def test_statistics_ride_in_ddp_only_where_they_are_gathered_every_step():
    """``dist.statistics_in_ddp: auto`` (the default): DDP's Python communication hook costs every
    step, so lagged statistics ride in its all-reduce only where a balancer gathers them every step."""
    from concord.balancing import RepresentationBoundary, build_balancer
    from concord.trainer.train import statistics_ride_in_ddp

    def boundary(name, statistics="auto", every="auto"):
        return RepresentationBoundary(build_balancer(name, ["a", "b"]), statistics=statistics, statistics_every=every)

    assert load_config("configs/tiny.yaml").dist.statistics_in_ddp == "auto"
    assert statistics_ride_in_ddp("auto", boundary("multibalance", every=1))
    assert not statistics_ride_in_ddp("auto", boundary("multibalance"))  # every 10 steps
    assert not statistics_ride_in_ddp("auto", boundary("equal"))  # gathered for logged steps only
    assert not statistics_ride_in_ddp("auto", boundary("graddrop"))  # current: summed before backward leaves z
    assert not statistics_ride_in_ddp("auto", boundary("multibalance", statistics="current", every=1))
    assert statistics_ride_in_ddp(True, boundary("equal")) and not statistics_ride_in_ddp(False, boundary("multibalance", every=1))
    with pytest.raises(ConfigError, match="dist.statistics_in_ddp: must be true, false or auto, got 'maybe'"):
        load_config("configs/tiny.yaml", ["dist.statistics_in_ddp=maybe"])
    with pytest.raises(ConfigError, match="dist.statistics_on_host: must be true, false or auto, got 'shm'"):
        load_config("configs/tiny.yaml", ["dist.statistics_on_host=shm"])
    # Forced where it cannot work: refused before any rank starts.
    with pytest.raises(ConfigError, match=r"dist\.statistics_on_host: true, but the ranks are not all on this host; set it to auto or false"):
        check_machine(load_config("configs/tiny.yaml", ["dist.statistics_on_host=true", "dist.nnodes=2"]))
    if platform.machine().lower() in ("x86_64", "amd64"):
        check_machine(load_config("configs/tiny.yaml", ["dist.statistics_on_host=true"]))  # 2 CPU ranks on this host


def test_yaml_words_read_as_true_false_or_numbers_where_text_is_meant_say_to_quote_them(tmp_path):
    """YAML 1.1 reads an unquoted yes/no/on/off as a boolean and 4 as a number: a label's text values
    written so must not end as 'expected a string, got True' with no hint of why."""
    text = Path("configs/adult.yaml").read_text()
    assert "positive: {income: [\">50K\"], never_married: [Never-married]}" in text
    for written, got, hint in (("yes", "True", 'quote the text, e.g. "yes"'), ("4", "4", 'quote it: "4"')):
        path = tmp_path / f"{written}.yaml"
        path.write_text(text.replace("never_married: [Never-married]", f"never_married: [{written}]"))
        with pytest.raises(ConfigError, match=rf"data\.convert\.positive\.never_married\[0\]: expected a string, got {got}; .*{hint}"):
            load_config(str(path))

    # A label's rule written inside labels (as a mapping for its column): told where the rule goes.
    path = tmp_path / "nested.yaml"
    path.write_text(text.replace("labels: {income: income, never_married: marital}",
                                 "labels: {income: {column: income, positive: [\">50K\"]}, never_married: marital}"))
    with pytest.raises(ConfigError, match=r"data\.convert\.labels\.income: expected a string, got \{'column': 'income', "
                                          r"'positive': \['>50K'\]\}; name the input column here \(income: COLUMN\) and give the "
                                          r"rule .* beside labels, under the same key: positive: \{income: \[VALUES\]\} or positive_range"):
        load_config(str(path))
