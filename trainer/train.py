"""The training loop: sharded model, fused embedding optimizer + dense optimizer, QPS, eval, logs."""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple

import torch
import torch.distributed as dist
import yaml
from torchrec.optim.keyed import CombinedOptimizer, KeyedOptimizerWrapper
from torchrec.optim.optimizers import in_backward_optimizer_filter

from concord.balancing import NonFiniteLossError, RepresentationBoundary
from concord.balancing.collectives import DDPRide, HostExchange, host_exchange_possible, sum_over_ranks
from concord.balancing.param_level import PARAMETER_LEVEL, ParameterLevelBalancer, build_parameter_level
from concord.embeddings.sharding import apply_fused_optimizer, shard_model, table_shardings
from concord.trainer.checkpoint import CheckpointError, Checkpointer, verify_together
from concord.trainer.config import Config, to_dict, training_label_means
from concord.trainer.data.prefetch import Prefetcher
from concord.trainer.data.layout import DataError
from concord.trainer.data.position import DataSchedule
from concord.trainer.data.reader import Batch, ParquetReader, columns_from_config, plan_together
from concord.trainer.evaluation import Evaluator
from concord.trainer.fingerprint import check_resume, fingerprint, nothing_to_resume_from, settings_changed
from concord.trainer.lifecycle import STOP_CHECK_EVERY, StopRequest, Stopped
from concord.trainer.model import ModelOutput, MultiTaskModel, boundary_method, build_model
from concord.trainer.nonfinite import NonFinitePolicy
from concord.trainer.observe.metrics import auc_memory_note, compact_results, format_table, quality_notes
from concord.trainer.observe.progress import progress_bar
from concord.trainer.observe.runlog import RunLog
from concord.trainer.observe.timing import QPSMeter, StepTimer
from concord.trainer.optimizers import DENSE_OPTIMIZERS, LRSchedule
from concord.trainer.pipeline import step_driver
from concord.trainer.rundir import RunDirLock, start_run, write_json_atomic
from concord.trainer.runtime import Runtime

logger = logging.getLogger("concord.train")


def statistics_ride_in_ddp(setting, boundary) -> bool:
    """``dist.statistics_in_ddp``: true or false as set; ``auto``: only where the boundary gathers
    lagged statistics on every step. With the ride DDP reduces every bucket through a Python
    communication hook, which costs a gloo step 0.15-0.25 ms whether or not anything rides; a
    collective of their own costs about 1 ms, but only on the steps that gather statistics (every
    10th for MultiBalance, EMTL and CoGrad by default, the logged ones for equal-weight rules), and
    nothing can ride with current-mode statistics, which are summed before backward leaves ``z``
    (docs/performance.md)."""
    if setting != "auto":
        return bool(setting)
    return boundary.statistics == "previous" and boundary.statistics_every == 1 and boundary.balancer.reads_statistics


def carry_statistics_in_ddp(dmp, model: MultiTaskModel, rt: Runtime) -> None:
    """On gloo, lagged statistics travel in DDP's gradient all-reduce (``DDPRide``), where
    :func:`statistics_ride_in_ddp` says it pays: a collective of their own costs a rank's core about
    1 ms there (docs/performance.md). DDP's group spans every rank, as the boundary's statistics
    group does. NCCL launches a collective for next to nothing: not used there."""
    ddp = dmp._dmp_wrapped_module
    if rt.world_size > 1 and rt.device.type == "cpu" and isinstance(ddp, torch.nn.parallel.DistributedDataParallel):
        ride = DDPRide(ddp.process_group)
        ddp.register_comm_hook(None, ride.hook)
        model.boundary.ride = ride
        if rt.is_main:
            logger.info("lagged balancer statistics travel in DDP's gradient all-reduce (dist.statistics_in_ddp)")


def exchange_statistics_on_host(setting, model: MultiTaskModel, rt: Runtime) -> None:
    """``dist.statistics_on_host``: lagged statistics summed through shared memory (``HostExchange``)
    where every rank runs on this host, instead of gloo's collective, which costs each statistics
    step a rank's core and its peer's (docs/performance.md); ``auto`` wherever it can, ``true``
    refuses a job where it cannot, ``false`` keeps the collective."""
    why_not = host_exchange_possible(rt.world_size, int(os.environ.get("LOCAL_WORLD_SIZE", 0)), rt.device)
    if setting is False or (why_not is not None and setting == "auto"):
        return
    if why_not is not None:
        raise RuntimeError(f"dist.statistics_on_host=true: {why_not}; set it to auto or false")  # the launcher says so first
    try:
        model.boundary.ride = HostExchange(rt.balancer_group)
    except OSError as error:  # the same on every rank: rank 0 made the block or could not
        if setting is True:
            raise
        if rt.is_main:
            logger.warning("dist.statistics_on_host: %s; a collective sums the lagged statistics instead", error)
        return
    if rt.is_main:
        logger.info("lagged balancer statistics summed through shared memory on this host (dist.statistics_on_host)")


@dataclass
class Trainer:
    """Holds the sharded model and optimizers; :meth:`fit` runs the configured training."""

    cfg: Config
    rt: Runtime
    model: MultiTaskModel  # the unwrapped module (its boundary is reachable here)
    dmp: torch.nn.Module
    optimizer: CombinedOptimizer
    log: RunLog
    dense_optimizer: KeyedOptimizerWrapper
    param_balancer: Optional[ParameterLevelBalancer] = None  # set for param_mgda / param_moco
    step: int = 0  # optimisation steps taken (skipped steps included)
    train_reader: Optional[ParquetReader] = None  # holds the counts of repaired rows
    eval_reader: Optional[ParquetReader] = None  # kept: its plan reads every file's footer
    data_schedule: Optional[DataSchedule] = None  # the epochs as steps; set by resume or train_batches
    run_id: str = ""
    lock: Optional[RunDirLock] = None  # rank 0: the run directory's ownership
    schedule: Optional[LRSchedule] = None  # set by fit
    resumed_lr: Tuple[Optional[Dict[str, Any]], bool] = (None, False)  # the checkpoint's schedule; data laid anew?
    evaluation_owed: Optional[int] = None  # the step whose evaluation a signal stopped (its checkpoint says so)
    saved_at: Optional[int] = None  # the step of the newest checkpoint this run wrote or resumed from
    nonfinite: Optional[NonFinitePolicy] = None  # set by build
    # each task's gradient norm at z summed over this invocation's logged steps, and their count
    grad_norm_sums: Dict[str, List[float]] = field(default_factory=dict)

    def precision(self):
        """The forward's autocast context (``train.precision``)."""
        if self.cfg.train.precision == "bf16":
            return torch.autocast(self.rt.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    @classmethod
    def build(cls, cfg: Config, rt: Runtime, own_run_dir: bool = True) -> "Trainer":
        """The sharded model and its optimizers. ``own_run_dir``: lock ``train.run_dir``, start or
        continue the run there and check the data (training); False builds the model alone (scoring)."""
        run_dir = Path(cfg.train.run_dir)
        lock, run_id = None, ""
        if rt.is_main and own_run_dir:  # before anything is written there: one job per directory, one run in it
            lock = RunDirLock(run_dir)
            lock.acquire()
            run_id = start_run(run_dir, resume=cfg.train.resume)
        if rt.world_size > 1:
            dist.barrier()
        torch.manual_seed(cfg.train.seed)
        model = build_model(cfg, "meta", process_group=rt.balancer_group)
        if rt.is_main and own_run_dir:
            logger.info("the heads' output biases start %s", _heads_start(cfg, model.heads.label_means))
        apply_fused_optimizer(model.ebc, cfg.model.embedding_optimizer, rt.device)
        dmp, plan = shard_model(model, cfg.model.tables, rt.device, batch_size=cfg.data.batch_size)
        if statistics_ride_in_ddp(cfg.dist.statistics_in_ddp, model.boundary):
            carry_statistics_in_ddp(dmp, model, rt)
        else:
            exchange_statistics_on_host(cfg.dist.statistics_on_host, model, rt)
        opt_cfg = cfg.train.dense_optimizer
        opt_cls = DENSE_OPTIMIZERS[opt_cfg.name]
        # fused: one kernel over all dense parameters instead of one per tensor.
        kwargs: Dict[str, Any] = {"lr": opt_cfg.lr, "weight_decay": opt_cfg.weight_decay, "fused": True}
        if opt_cfg.name != "sgd":
            kwargs["eps"] = opt_cfg.eps
        dense = KeyedOptimizerWrapper(
            dict(in_backward_optimizer_filter(dmp.named_parameters())), lambda params: opt_cls(params, **kwargs)
        )
        optimizer = CombinedOptimizer([dmp.fused_optimizer, dense])
        optimizer.save_param_groups(False)  # hyper-parameters come from the config: state tensors only
        log = RunLog(run_dir, run_id, enabled=rt.is_main and own_run_dir)
        if rt.is_main and own_run_dir:
            (run_dir / "config.yaml").write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
            shardings = table_shardings(plan)
            log.write({"kind": "plan", "world_size": rt.world_size, "sharding": shardings})
            replicated = sorted(t for t, kind in shardings.items() if kind == "data_parallel")
            if replicated:
                logger.info("tables %s are data_parallel (their sharding_types say so): replicated and trained by the "
                            "dense optimizer (train.dense_optimizer), not by model.embedding_optimizer", ", ".join(replicated))
        trainer = cls(cfg, rt, model, dmp, optimizer, log, dense, run_id=run_id, lock=lock,
                      nonfinite=NonFinitePolicy(cfg, rt.balancer_group, log))
        if own_run_dir:
            trainer.check_data()
        # The model was built with the configured balancer, whose parameters (if any) the dense
        # optimizer and DDP already hold: keep that instance.
        trainer.use_method(cfg.balancer.name, cfg.balancer.knobs, rebuild=False)
        return trainer

    def use_method(self, name: str, knobs: Optional[Dict[str, Any]] = None, rebuild: bool = True) -> None:
        """Switches the balancing method on the same model (used by ``concord bench``). ``none``
        switches the boundary off: plain training on the mean task loss, the cost baseline.
        A swapped-in balancer with learnable parameters (uncertainty) is not trained: they are in
        neither the dense optimizer nor DDP, which were built with the model."""
        boundary = self.model.boundary
        boundary.enabled = name != NO_BOUNDARY
        name = "equal" if name == NO_BOUNDARY else name
        if rebuild:
            balancer, reduction = boundary_method(self.cfg, name, knobs if knobs is not None else {})
            boundary.balancer, boundary.reduction = balancer, reduction
        if boundary.statistics == "previous":  # the trainer's own flags decide, at the same step (nonfinite.py)
            boundary.on_nonfinite_loss = "drop_task"
        else:
            boundary.on_nonfinite_loss = "raise" if self.cfg.train.on_nonfinite == "abort" else "skip_step"
        self.param_balancer = None
        if name in PARAMETER_LEVEL:
            self.param_balancer = build_parameter_level(
                name, self.cfg.task_names, list(self.model.bottom.parameters()), self.rt.balancer_group, **(knobs or {})
            )

    # --- data -------------------------------------------------------------------------------------
    def _reader(self, spec: str, train: bool) -> ParquetReader:
        data, columns = self.cfg.data, columns_from_config(self.cfg)
        return ParquetReader(
            spec, columns, data.batch_size, self.rt.rank, self.rt.world_size, drop_last=train,
            shuffle=train and data.shuffle, seed=self.cfg.train.seed, shuffle_rows=data.shuffle_rows,
            groups=plan_together(spec, columns),
        )

    def check_data(self) -> None:
        """Before the first step: both splits open with the right schema (every file), their first row
        group decodes cleanly (ids in range, labels and weights valid) on every rank, and every sample
        weight is valid (each rank its share of the row groups)."""
        splits = [("data.train", self.cfg.data.train, True)]
        if self.cfg.data.eval:
            splits.append(("data.eval", self.cfg.data.eval, False))
        for key, spec, train in splits:
            reader = self._reader(spec, train)
            if reader.total_rows == 0:
                raise DataError(f"{key}: {spec} has no rows")
            reader.check_weights()
            next(reader.batches(), None)
            reader.forget_reads()  # training counts its own repairs, from its first row
            if train:
                self.train_reader = reader
            else:
                self.eval_reader = reader
        if self.rt.is_main and self.cfg.data.eval:
            binary = sum(t.type == "binary" for t in self.cfg.tasks)
            if note := auc_memory_note(self.eval_reader.total_rows, binary, self.rt.device, f"data.eval {self.cfg.data.eval}"):
                logger.warning(note)
            shared = _files_of(self.train_reader) & _files_of(self.eval_reader)
            if shared:  # by mistake, mostly (a path copied twice); the figures would be training figures
                logger.warning("data.eval reads %d of data.train's files (%s%s): its figures are not held out",
                               len(shared), sorted(shared)[0], ", ..." if len(shared) > 1 else "")

    # --- checkpoints --------------------------------------------------------------------------------
    @property
    def checkpointer(self) -> Checkpointer:
        return Checkpointer(Path(self.cfg.train.run_dir) / "checkpoints", self.cfg.train.keep_checkpoints)

    def checkpoint_state(self, step: int) -> Dict[str, Any]:
        """Everything a resumed run needs, tensors only (see concord.trainer.checkpoint)."""
        state: Dict[str, Any] = {
            "model": without_boundary_records(self.dmp.state_dict()),
            "optimizer": self.optimizer.state_dict(),
            "progress": {"step": torch.tensor(step)},
        }
        if self.param_balancer is not None:
            state["param_balancer"] = self.param_balancer.state_dict()
        return state

    def fingerprint(self) -> Dict[str, Any]:
        reader = self.train_reader or self._reader(self.cfg.data.train, train=True)  # no re-scan per checkpoint
        return fingerprint(self.cfg, self.rt.world_size, reader.total_rows)

    def save_checkpoint(self, step: int) -> Path:
        info = {"fingerprint": self.fingerprint(), "run_id": self.run_id, "config": to_dict(self.cfg),
                "data": self.data_schedule.record(step)}
        if self.schedule is not None:
            info["lr"] = self.schedule.record()
        if self.evaluation_owed == step:
            info["evaluation_owed"] = True
        path = self.checkpointer.save(step, self.checkpoint_state(step), info)
        self.saved_at = step
        return path

    def resume(self) -> int:
        """Loads the newest intact checkpoint, if any, after checking that it was written by a
        compatible setup (:mod:`concord.trainer.fingerprint`); returns the step to continue from."""
        path = self.checkpointer.latest() if self.cfg.train.resume else None
        from_other_run = path is None and bool(self.cfg.train.resume_from)
        if from_other_run:
            path = _checkpoint_in(Path(self.cfg.train.resume_from))
        if path is None:
            return 0
        info = self.checkpointer.info(path)
        saved, now = info.get("fingerprint", {}), self.fingerprint()
        changed = check_resume(path, saved, now, self.cfg.train.allow_changes, from_other_run)
        self.dense_optimizer.init_state()  # lazy optimizer state must exist to be loaded into
        state = self.checkpoint_state(0)
        fresh = {}
        if "balancer" in changed:  # allowed: the new balancer keeps its fresh state and parameters
            fresh = pop_balancer_entries(state)
            if self.rt.is_main:
                logger.info("resuming with balancer %s (was %s): its state starts fresh", now["balancer"], saved.get("balancer"))
        Checkpointer.load(path, state)
        restore_entries(state, fresh)
        self.dmp.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        if self.param_balancer is not None:
            self.param_balancer.load_state_dict(state["param_balancer"])
        step = int(state["progress"]["step"])
        if self.rt.is_main:
            print(f"resumed from {path} at step {step}", flush=True)
            now_config = json.loads(json.dumps(to_dict(self.cfg)))  # as concord.json holds it: lists, not tuples
            changes = settings_changed(info["config"], now_config) if isinstance(info.get("config"), dict) else ""
            if changes:
                print(f"  with settings other than that checkpoint's: {changes}", flush=True)
        self.log.write({"kind": "resume", "step": step, "checkpoint": str(path)})
        layout = (self.rt.world_size, self.cfg.data.batch_size)
        saved_layout = (int(saved.get("world_size", layout[0])), int(saved.get("batch_size", layout[1])))
        self.data_schedule = self._resumed_schedule(step, info.get("data"), saved_layout, now["data"]["rows"])
        self.resumed_lr = (info.get("lr"), saved_layout != layout)
        self.evaluation_owed = step if info.get("evaluation_owed") else None
        return step

    def _resumed_schedule(self, step: int, record: Optional[Dict[str, Any]], saved_layout: Tuple[int, int], rows: int) -> DataSchedule:
        """Where the checkpoint left the data; on other ranks or another batch size than its
        ``saved_layout`` (world size, batch size), which the fingerprint check let through, the rest of
        its epoch shared out anew, said so."""
        batch, world = self.cfg.data.batch_size, self.rt.world_size
        schedule = DataSchedule.resumed(step, record, *saved_layout, rows, world, batch)
        reading = schedule.current
        if reading.pieces is not None and self.rt.is_main:
            ranks = f"{world} rank{'s' if world > 1 else ''}"
            print(f"  epoch {reading.epoch} goes on with its {reading.rows_held} rows not yet trained, shared out in "
                  f"{reading.steps} steps x {batch} rows x {ranks} ({reading.rows_left_out} left out, under one "
                  f"batch a rank); later epochs are read by {ranks} as usual", flush=True)
            self.log.write({"kind": "reshared", "step": step, "epoch": reading.epoch, "rows": reading.rows_held,
                            "steps": reading.steps, "left_out": reading.rows_left_out})
        return schedule

    # --- training ---------------------------------------------------------------------------------
    def fit(self) -> Dict[str, Any]:
        """Resumes if it can, trains to the configured step, evaluates, writes the summary. SIGTERM or
        SIGINT stop it after a step, or in an evaluation, that every rank agrees on (SIGTERM writes a
        checkpoint first)."""
        cfg, rt = self.cfg, self.rt
        step = self.resume()
        batches = self.train_batches(start_step=step)
        if cfg.data.prefetch:
            pin = (lambda b: b.pin_memory()) if rt.device.type == "cuda" else None
            batches = Prefetcher(batches, cfg.data.prefetch, pin)
        total = self._total_steps(step)
        self.schedule = self._schedule(total, step)
        qps = QPSMeter(cfg.data.batch_size * rt.world_size, cfg.train.qps_skip_steps, cfg.train.qps_window)
        stop = StopRequest().install()
        started, self.saved_at = time.time(), step
        try:
            step = self._train_until(total, step, step_driver(self, batches), qps, stop)
            seconds = time.time() - started
            final = self.evaluate(step, self._agreed(stop))
            if final is None:  # a signal: the last checkpoint is written (or now), and a relaunch evaluates it
                self._stop_if_asked(step, stop)
        finally:
            stop.uninstall()
            if isinstance(batches, Prefetcher):
                batches.close()
        return self._finish(step, final, qps, seconds)

    def _schedule(self, total: int, step: int) -> LRSchedule:
        groups = list(self.dense_optimizer.param_groups)
        if self.cfg.train.lr_schedule.embeddings:
            groups += list(self.dmp.fused_optimizer.param_groups)
        return LRSchedule.resumed(self.cfg.train.lr_schedule, total, groups, step, *self.resumed_lr)

    def _total_steps(self, step: int) -> int:
        total = self.data_schedule.total_steps(self.cfg.train.epochs)
        if self.cfg.train.max_steps is not None:
            total = min(total, self.cfg.train.max_steps)
        if step >= total and self.rt.is_main:
            print(
                f"{self.cfg.train.run_dir} already holds this run's last checkpoint (step {step} of {total}): "
                "evaluating it without training. To train again, pass train.resume=false (the finished run "
                "moves to previous-<id>/) or another train.run_dir.",
                flush=True,
            )
        return total

    def _train_until(self, total: int, step: int, steps, qps: QPSMeter, stop: StopRequest) -> int:
        cfg = self.cfg.train
        timer = StepTimer(self.rt.device)
        bar = progress_bar(total, "train", "step", enabled=self.rt.is_main and cfg.progress)
        bar.update(step)
        if self.evaluation_owed == step < total:  # a signal stopped the evaluation due here: it comes first
            self._evaluate_during_training(step, bar, stop)
            if self.evaluation_owed == step:  # stopped again
                self._stop_if_asked(step, stop, bar)
        self.dmp.train()
        while step < total:
            self.step = step
            if step + 2 == total and total % cfg.log_every != 0:
                self.model.boundary.gather_for_log()  # the last step's log, off the schedule
            out, timings = steps.step(timer)
            step += 1
            qps.update(timings)
            bar.update(1)
            if step % cfg.log_every == 0 or step == total:
                self._log_train(step, out.losses, qps)
                if qps.ready:  # reading the loss is a host sync on GPU: only on logging steps
                    bar.set_postfix(loss=f"{float(out.objective.detach()):.4g}", qps=f"{qps.windowed_qps():,.0f}", refresh=False)
            if step < total and ((cfg.eval_every and step % cfg.eval_every == 0)
                                 or (cfg.eval_each_epoch and self._epochs_ended_at(step) is not None)):
                steps.pause()
                self._evaluate_during_training(step, bar, stop)
            if cfg.checkpoint_every and step % cfg.checkpoint_every == 0:
                self.save_checkpoint(step)
            if step % STOP_CHECK_EVERY == 0 or step == total or self.evaluation_owed == step:
                self._stop_if_asked(step, stop, bar)
        bar.close()
        steps.close()
        if cfg.checkpoint_final and self.saved_at != step:
            self.save_checkpoint(step)
        return step

    def _agreed(self, stop: StopRequest) -> Callable[[], bool]:
        """The question an evaluation asks every few batches (collective): has any rank a signal?"""
        return lambda: stop.agreed(self.rt.balancer_group) is not None

    def _stop_if_asked(self, step: int, stop: StopRequest, bar=None) -> None:
        """Collective: where any rank received a signal, every rank stops after ``step`` (raises
        :class:`Stopped`), SIGTERM writing the step's checkpoint where there is none yet."""
        signum = stop.agreed(self.rt.balancer_group)
        if signum is None:
            return
        if bar is not None:
            bar.close()
        preempted = signum == signal.SIGTERM
        if preempted and self.saved_at != step:
            self.save_checkpoint(step)
        self.log.write({"kind": "stopped", "step": step, "signal": signal.Signals(signum).name})
        self.log.close()  # TensorBoard's writer holds up to two minutes of scalars unwritten
        raise Stopped(signum, step, checkpoint=preempted)

    def _finish(self, step: int, final: Dict[str, Dict[str, float]], qps: QPSMeter, seconds: float) -> Dict[str, Any]:
        cfg, reader = self.cfg, self.train_reader
        summary = {
            "kind": "summary",
            "step": step,
            "wall_seconds": seconds,
            "qps_lifetime": qps.lifetime_qps(),
            "qps_window": qps.windowed_qps(),
            "breakdown": qps.breakdown(),
            "eval": final,
            "balancer": cfg.balancer.name,
            "skipped_steps": self.nonfinite.skipped_steps,
            "data_repairs": self._data_repairs(),
            "rows": {
                "train": reader.total_rows,
                "trained_per_epoch": reader.total_rows - reader.rows_left_out(),
                "left_out_per_epoch": reader.rows_left_out(),
            },
        }
        self.log.write(summary)
        if self.rt.is_main:
            write_json_atomic(Path(cfg.train.run_dir) / "summary.json", summary)
            print(f"\nConcord: {step} steps, balancer {cfg.balancer.name}, world size {self.rt.world_size}")
            print(format_table(final, cfg.tasks, cfg.data.weight_column))
            means = {name: total / count for name, (total, count) in self.grad_norm_sums.items()}
            for note in quality_notes(final, cfg.tasks, means, cfg.balancer.name, self.model.heads.started_at_labels,
                                      self.model.heads.label_means or training_label_means(cfg)):
                print(note)
            print(_qps_line(qps))
            print(f"outputs: {cfg.train.run_dir} (summary.json, metrics.jsonl, tb/, checkpoints/, config.yaml)")
        self.log.close()
        if self.lock is not None:
            self.lock.release()
        return summary

    def train_step(self, batches: Iterator[Batch], timer: StepTimer):
        """One optimisation step on the next batch, without a pipeline; returns the model output and
        phase timings (s)."""
        timer.start()
        batch = next(batches).to(self.rt.device, non_blocking=True)
        timer.mark("data")
        out = self.forward(batch)
        timer.mark("forward")
        bad = self.backward(out)
        timer.mark("backward")
        self.update(bad)
        self.optimizer.zero_grad()
        timer.mark("optimizer")
        return out, self.step_timings(timer)

    def forward(self, batch: Batch) -> ModelOutput:
        if self.schedule is not None:
            self.schedule.apply(self.step)
        with self.precision():
            return self.dmp(batch)

    def backward(self, out: ModelOutput) -> List[str]:
        """Backward through the boundary (or a parameter-level method's own); returns the tasks whose
        loss was not finite on some rank when the step is to be dropped. A non-finite task loss on any
        rank stops training or drops the step on every rank together (:mod:`concord.trainer.nonfinite`)."""
        boundary = self.model.boundary
        guard = self.nonfinite.guard(boundary.enabled, self.param_balancer is not None, boundary.statistics == "previous")
        bad = self.nonfinite.tasks_before_backward(out.losses, guard, self.step + 1)
        if bad:
            return bad
        objective = out.objective
        if guard == "after_backward":
            canaries = [head.out.bias for head in self.model.heads.heads]
            objective = self.nonfinite.mark(objective, out.losses, canaries)
        if self.param_balancer is not None:
            # The T per-task gradients and the backward of sum_k c_k L_k: the boundary passes the
            # plain gradient through, with no statistics (the losses are weighted already).
            with boundary.passthrough():
                self.param_balancer.objective(out.losses).backward()
            return []
        try:
            objective.backward()
        except NonFiniteLossError as error:  # raised on every rank alike, before any update
            self.nonfinite.stop(error.tasks, self.step + 1)
        if guard == "after_backward":
            return self.nonfinite.tasks_after_backward(canaries)
        return boundary.skipped_tasks if guard == "boundary" else []

    def update(self, bad: List[str]) -> None:
        """The optimizer step, or the dropped step's record when ``bad`` names tasks."""
        if bad:
            self.nonfinite.skip(bad, self.step + 1)
            return
        if self.cfg.train.clip_grad_norm > 0:  # DDP averaged the gradients: every rank clips alike
            torch.nn.utils.clip_grad_norm_(self.dense_optimizer.params.values(), self.cfg.train.clip_grad_norm)
        self.optimizer.step()

    def step_timings(self, timer: StepTimer) -> Dict[str, float]:
        timings = timer.read()
        boundary = self.model.boundary
        used = boundary.enabled and self.param_balancer is None
        clock = boundary.backward_clock if used else None
        timings.defer("boundary", clock.seconds if clock is not None else (lambda: 0.0))  # CUDA: read when logged
        timings["boundary_comm"] = boundary.comm_seconds if used else 0.0
        return timings

    def _data_repairs(self) -> Dict[str, int]:
        """Counted repairs of the training data (hashed ids, imputed values), summed over ranks."""
        counts = self.train_reader.counts if self.train_reader is not None else {"hashed_ids": 0, "imputed_dense": 0}
        values = sum_over_ranks(torch.tensor([float(v) for v in counts.values()], dtype=torch.float64), self.rt.balancer_group)
        return dict(zip(counts, (int(v) for v in values.tolist())))

    def train_batches(self, start_step: int = 0) -> Iterator[Batch]:
        """The training split, full batches only, epoch after epoch (the same count on every rank),
        starting where step ``start_step`` left off."""
        reader = self.train_reader = self.train_reader or self._reader(self.cfg.data.train, train=True)
        steps = reader.full_batches_per_rank()
        if steps == 0:
            raise DataError(
                f"data.train: {self.cfg.data.train}: {reader.total_rows} rows make not one full batch of "
                f"{self.cfg.data.batch_size} rows per rank for {self.rt.world_size} ranks; lower data.batch_size"
            )
        if self.data_schedule is None:
            self.data_schedule = DataSchedule.fresh(reader.total_rows, self.rt.world_size, reader.batch_size)
        if start_step == 0 and self.rt.is_main:
            logger.info(
                "an epoch trains %d steps x %d rows x %d ranks = %d of the %d training rows; %d left out (%s)",
                steps, reader.batch_size, self.rt.world_size, reader.total_rows - reader.rows_left_out(),
                reader.total_rows, reader.rows_left_out(),
                "other rows each epoch: shuffled" if reader.shuffle else "the same rows each epoch: data.shuffle is off",
            )
        return self._epochs(reader, self.data_schedule, start_step)

    @staticmethod
    def _epochs(reader: ParquetReader, schedule: DataSchedule, start_step: int) -> Iterator[Batch]:
        """Yields the same number of batches an epoch on every rank, epoch after epoch. An epoch's
        order is a function of the seed and the epoch, so a step's data is a function of the step (and
        of the position a resumed run started from) and a resumed run continues exactly."""
        reading = schedule.reading_at(start_step)
        done = start_step - reading.began_at
        while True:
            if reading.pieces is None:
                batches = reader.batches(epoch=reading.epoch, skip_rows=done * reader.batch_size)
            else:
                batches = reader.piece_batches(reading.epoch, reading.share(reader.rank, done))
            for _ in range(reading.steps - done):
                yield next(batches)
            reading, done = schedule.reading_at(reading.ends_at), 0

    def _log_train(self, step: int, local_losses: torch.Tensor, qps: QPSMeter) -> None:
        stats = self.model.boundary.last_stats
        losses = stats.losses.tolist() if stats is not None else local_losses.detach().tolist()
        names = self.cfg.task_names
        telemetry = self.model.boundary.telemetry()
        if self.param_balancer is not None:
            telemetry = {**telemetry, **self.param_balancer.last_telemetry}
        for name, norm in zip(names, telemetry.get("grad_norm") or ()):
            if norm is not None and math.isfinite(float(norm)):
                total = self.grad_norm_sums.setdefault(name, [0.0, 0])
                total[0], total[1] = total[0] + float(norm), total[1] + 1
        record = {
            "kind": "train",
            "step": step,
            "loss": dict(zip(names, losses)),
            "qps_window": qps.windowed_qps(),
            "qps_lifetime": qps.lifetime_qps(),
            "breakdown": qps.breakdown(),
            "balancer": _per_task(telemetry, names),
        }
        self.log.write(record, step)

    # --- evaluation -------------------------------------------------------------------------------
    def _epochs_ended_at(self, step: int) -> Optional[int]:
        """The epochs completed where ``step`` (counted from 1) ends one, else None (at step 0 the
        training data need not be open yet)."""
        if step == 0 or self.data_schedule is None:
            return None
        return self.data_schedule.epochs_ended_at(step)

    def _evaluate_during_training(self, step: int, bar, stop: StopRequest) -> None:
        """The evaluation due at ``step``, its line above the progress bar. A signal ``stop`` receives
        stops it (a preemption's grace period is shorter than a long evaluation): the step's
        checkpoint then owes it, and the run resumed there evaluates first."""
        results = self.evaluate(step, self._agreed(stop))
        self.evaluation_owed = step if results is None else None
        if self.rt.is_main and results:
            epoch = self._epochs_ended_at(step)
            where = f"epoch {epoch}, step {step}" if epoch is not None else f"step {step}"
            bar.write(f"eval at {where}: {compact_results(results, self.cfg.tasks)}")

    def evaluate(self, step: int, stop: Optional[Callable[[], bool]] = None) -> Optional[Dict[str, Dict[str, float]]]:
        """NE/AUC/calibration/MSE per task on the held-out split (every row once); the record names
        the epochs completed where ``step`` ends one. None, and no record, where ``stop`` (collective,
        asked every few batches) stopped it."""
        if not self.cfg.data.eval:
            return {}
        self.eval_reader = self.eval_reader or self._reader(self.cfg.data.eval, train=False)
        results = Evaluator(self.cfg, self.rt, self.dmp, self.model.heads).run(self.eval_reader, stop=stop)
        self.eval_reader.forget_reads()  # the row group it holds decoded, until the next evaluation
        if results is None:
            return None
        record = {"kind": "eval", "step": step, "eval": results}
        epoch = self._epochs_ended_at(step)
        if epoch is not None:
            record["epoch"] = epoch
        self.log.write(record, step)
        return results


NO_BOUNDARY = "none"  # concord bench: the model without the boundary


def _files_of(reader: ParquetReader) -> set:
    return {os.path.realpath(group.file) for group in reader.groups}


def _heads_start(cfg: Config, label_means: Optional[Dict[str, float]]) -> str:
    setting = f"model.output_bias: {cfg.model.output_bias}"
    if label_means is None:
        if cfg.model.output_bias == "auto":  # data convert did not write: say how to start them at the labels
            return f"as torch initialises them ({setting}, and convert recorded no label means beside data.train; labels reads them from its files)"
        return f"as torch initialises them ({setting})"
    recorded = all(training_label_means(cfg).get(name) is not None for name in label_means)
    means = ", ".join(f"{name} {mean:.6g}" for name, mean in label_means.items())
    return f"at the training labels' means, {'recorded by convert' if recorded else 'read from data.train'} ({setting}): {means}"


def _checkpoint_in(source: Path) -> Path:
    """``train.resume_from``: a checkpoint directory itself, or a run directory's newest intact one."""
    if (source / "concord.json").is_file() or (source / ".metadata").is_file():
        problem = verify_together(source)
        if problem is not None:
            raise CheckpointError(f"train.resume_from: {source} is damaged: {problem}")
        return source
    path = Checkpointer(source / "checkpoints").latest()
    if path is None:
        raise nothing_to_resume_from(source)
    return path


def pop_balancer_entries(state: Dict[str, Any]) -> Dict[tuple, Any]:
    """Removes (and returns, by path) the balancer's state and parameters from a checkpoint state."""
    popped = {}
    for section in ("model", "optimizer"):
        for key in [k for k in state[section] if "boundary._extra_state" in k or "balancer_parameters" in k]:
            popped[(section, key)] = state[section].pop(key)
    return popped


def without_boundary_records(model_state: Dict[str, Any]) -> Dict[str, Any]:
    """``model_state`` less the boundary's record of its tasks and method: names, which DCP would save
    as pickles, and which the fingerprint beside every checkpoint holds already."""
    for key, value in model_state.items():
        if key.endswith("boundary._extra_state"):
            for name in RepresentationBoundary.record_keys:
                value.pop(name, None)
    return model_state


def restore_entries(state: Dict[str, Any], entries: Dict[tuple, Any]) -> None:
    for (section, key), value in entries.items():
        state[section][key] = value


def _per_task(telemetry: Dict[str, Any], names: List[str]) -> Dict[str, Any]:
    """Per-task lists become {task: value} so logs and TensorBoard read by name."""
    out: Dict[str, Any] = {}
    for key, value in telemetry.items():
        if isinstance(value, list) and len(value) == len(names):
            out[key] = dict(zip(names, value))
        else:
            out[key] = value
    return out


def _qps_line(qps: QPSMeter) -> str:
    life, win = qps.lifetime_qps(), qps.windowed_qps()
    if life is None:
        if qps.steps_seen == 0:
            return "QPS: not measured (no step trained in this invocation)"
        return f"QPS: not measured ({qps.steps_seen} step(s) trained in this invocation, all among the first {qps.qps_skip_steps} that QPS skips: train.qps_skip_steps)"
    b = qps.breakdown()
    return (
        f"training QPS (global, first steps skipped): lifetime {life:,.0f}, last {len(qps.window)} steps {win:,.0f}\n"
        f"step {b['step_ms']:.1f} ms = data {b['data_ms']:.1f} + "
        + (f"input dist {b['input_dist_ms']:.1f} + " if "input_dist_ms" in b else "")
        + f"forward {b['forward_ms']:.1f} + backward "
        f"{b['backward_ms']:.1f} + optimizer {b['optimizer_ms']:.1f}; boundary {b['boundary_ms']:.2f} ms "
        f"({b.get('boundary_share_pct', 0.0):.2f}% of the step, inside backward; of it "
        f"{b['boundary_comm_ms']:.2f} ms blocked on the statistics' sum over ranks, waiting for peers included)"
    )
