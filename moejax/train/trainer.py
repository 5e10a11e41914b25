"""The Trainer: one run of train_and_evaluate, in named steps.

    trainer = Trainer(config, workdir, stream=..., on_log=..., held=stack)
    trainer.setup()      # validate, lock the workdir, data, model, steps
    trainer.restore()    # newest good checkpoint (or a fresh start), writers
    trainer.train()      # the loop: steps, logging, evals, checkpoints,
                         # signals, NaN policy, data read errors
    summary = trainer.summary()

`evaluate(step)` and `checkpoint(step)` are the loop's periodic actions.
The state a run carries (the TrainState, counters, timing, the pending
step's metrics) lives on the instance, so each step reads as what it does.
moejax.train.loop.train_and_evaluate runs these in order inside the
workdir's lock; the guarantees (exact resume, SIGTERM/SIGINT saves, NaN
policy, full disks, damaged data) are those documented there and in
docs/reliability.md.
"""

import itertools
import json
import math
import os
import signal
import sys
import time

from flax import nnx
import jax
import numpy as np

from moejax import data as data_lib
from moejax import models
from moejax import sharding as sharding_lib
from moejax.train import checkpoint as ckpt_lib
from moejax.train import init_from as init_from_lib
from moejax.train import loop as loop_lib
from moejax.train import optim
from moejax.train import state as state_lib
from moejax.train import step as step_lib
from moejax.train import throughput
from moejax.train import validation
from moejax.train import writers as writers_lib
from moejax.train.errors import TrainingDivergedError
from moejax.train.errors import TrainingError
from moejax.train.errors import TrainingPreempted
from moejax.train.errors import WorkdirWriteError


class Trainer:
  """One run of config's model on config's data in workdir (see module doc).

  Args:
    config: the run's ConfigDict.
    workdir: the run's directory.
    stream: where the progress bar and messages go (default sys.stdout).
    on_log: optional callable(step, flat train metrics) after each logged
      step.
    held: a contextlib.ExitStack that keeps the workdir's lock until the
      run ends (train_and_evaluate's).
  """

  def __init__(self, config, workdir, *, stream=None, on_log=None, held):
    self.config = config
    self.workdir = os.path.abspath(workdir)
    self.stream = stream or sys.stdout
    self.on_log = on_log
    self.held = held
    self.is_main = jax.process_index() == 0
    self.ckpt_dir = os.path.join(self.workdir, "checkpoints")

  def _print(self, text):
    print(text, file=self.stream, flush=True)

  # ----------------------------------------------------------- setup

  def setup(self):
    """Validates the config, claims the workdir, builds the data, the
    model's TrainState, the jitted steps and the Checkpointer. Every
    refusal (config, resume config, lock, data) comes before compiling."""
    config, workdir = self.config, self.workdir
    loop_lib.validate_config(config, num_devices=jax.device_count())
    loop_lib._check_resume_config(config, self.ckpt_dir)  # pylint: disable=protected-access
    loop_lib._claim_workdir(  # pylint: disable=protected-access
        workdir, self.held,
        on_takeover=lambda text: self._print(f"WARNING: {text}"))
    # The data first: its refusals (seq_len vs the split, ...) come before
    # anything is compiled.
    train_ds, self.eval_ds = loop_lib.make_datasets_checked(config)
    if self.is_main:
      try:
        ckpt_lib.save_config(config, workdir)
      except OSError as e:
        raise WorkdirWriteError(
            f"cannot write {workdir}/config.json: "
            f"{ckpt_lib.describe_error(e)}. Nothing was started. Make the "
            f"workdir writable or free space, then run again.") from e

    self.total_steps = int(config.num_train_steps)
    mesh = state_lib.make_train_mesh(config.mesh)
    rules = sharding_lib.make_rules(loop_lib._config_dict(  # pylint: disable=protected-access
        config.get("sharding_rules") or {}))
    o = config.optimizer
    schedule = optim.make_schedule(
        learning_rate=o.learning_rate, total_steps=self.total_steps,
        warmup_steps=o.warmup_steps,
        end_learning_rate_fraction=o.end_learning_rate_fraction)
    tx = optim.make_optimizer(
        schedule, weight_decay=o.weight_decay, b1=o.b1, b2=o.b2, eps=o.eps,
        grad_clip_norm=o.grad_clip_norm)
    self.graphdef, self.state, model = state_lib.create_train_state(
        loop_lib.model_factory(config), tx, mesh, rules=rules,
        expert_parallel=config.get("expert_parallel") or None)
    self.task = loop_lib.make_task(config, model)
    self.seq_len = (config.data.get("seq_len") if config.task == "lm"
                    else None)
    self.counts = models.count_params(model)
    self.flops = models.flops_per_token(model, self.seq_len)
    self.moe_layer_ids = tuple(model.moe_layers)
    del model  # its arrays now live in `state`
    self._print(f"mesh {dict(mesh.shape)} on {jax.device_count()} "
                f"{jax.devices()[0].platform} devices; expert_parallel="
                f"{config.get('expert_parallel') or None}")
    self.peak = throughput.peak_tflops(
        float(config.get("peak_tflops", 0.0) or 0.0))
    self._print(
        f"peak {self.peak.tflops_per_device:.4g} TFLOP/s per device ("
        + ("measured float32 matmul rate" if self.peak.measured
           else self.peak.source)
        + "): MFU = model TFLOP/s / (peak x devices)")
    self.profile_steps = validation.parse_steps(
        config.get("profile_steps", ""))

    aux_weights = loop_lib._config_dict(config.aux_loss_weights)  # pylint: disable=protected-access
    self.skip_nonfinite = config.get("nan_policy", "stop") == "skip"
    self.max_skips = int(config.get("max_consecutive_nan_skips", 3))
    self.train_step = step_lib.make_train_step(
        self.graphdef, self.task, tx, schedule, aux_weights,
        state_shardings=state_lib.state_shardings(self.state),
        skip_nonfinite=self.skip_nonfinite,
        inject_nan_steps=validation.parse_steps(
            config.get("inject_nan_steps", "")),
        micro_batches=int(config.get("micro_batches", 1) or 1))
    self.eval_step = step_lib.make_eval_step(self.graphdef, self.task,
                                             aux_weights)
    self.train_iter = iter(train_ds)
    self.bsharding = data_lib.batch_sharding(
        mesh, state_lib.batch_axes(mesh, rules))
    self.ckpt = ckpt_lib.Checkpointer(
        self.ckpt_dir, max_to_keep=config.max_checkpoints_to_keep,
        async_save=config.get("async_checkpointing", True))

  # ----------------------------------------------------------- restore

  def _on_skip(self, step, reason, moved_to):
    # moved_to None: a step that cannot be read, left in place (the reason
    # says so), or another process moves it.
    text = f"WARNING: skipped checkpoint step {step}: {reason}" + (
        f"; moved it to {moved_to}" if moved_to else "")
    self._print(text)  # once: not also logged (absl's log is the terminal)

  def restore(self):
    """Restores the newest checkpoint that loads and verifies (state, data
    position, counters, timing) or starts fresh; opens the metric writers
    and the progress bar."""
    config, ckpt = self.config, self.ckpt
    self.start_step, self.tokens_seen = 0, 0
    # Run totals across resumes: seconds of steps after each invocation's
    # first (compile) logged interval, the tokens of those steps, and the
    # seconds of those first intervals (compile, plus one step).
    self.timing = dict(train_time_s=0.0, timed_tokens=0, compile_time_s=0.0)
    self.skips = dict(total=0, in_a_row=0)  # nan_policy 'skip' counters
    try:
      restored = ckpt.restore_latest(self.state, self.train_iter,
                                     on_skip=self._on_skip)
      if restored is not None and restored[1].get("config"):
        # The step actually restored (maybe older than the newest) must
        # agree.
        validation.check_resume_config(restored[1]["config"], config,
                                       ckpt.step_path(restored[2]))
    except BaseException:
      ckpt.close(quiet=True)
      raise
    if restored is not None:
      self.state, meta, self.start_step = restored
      self.tokens_seen = int(meta.get("tokens_seen", 0))
      self.skips.update(total=int(meta.get("nan_skips_total", 0)),
                        in_a_row=int(meta.get("nan_skips_in_a_row", 0)))
      for key in self.timing:  # time of the invocations before this one
        self.timing[key] = type(self.timing[key])(meta.get(key, 0))
      self._print(f"resumed from {ckpt.directory}/{self.start_step} (step "
                  f"{self.start_step}, {self.tokens_seen:,} tokens)")
    elif (config.get("init_from") or {}).get("path"):
      self._init_from(config.init_from)
    # Describe after the restore message so the header is the same either
    # way.
    self._print(models.describe(
        nnx.merge(self.graphdef, self.state.params, self.state.model_state),
        self.seq_len))

    self.writer = None
    if self.is_main:
      try:
        jsonl = writers_lib.JsonlWriter(
            os.path.join(self.workdir, "metrics.jsonl"))
        jsonl.truncate_after(self.start_step)
        tb = writers_lib.TensorBoardWriter(
            os.path.join(self.workdir, "tensorboard"))
        if self.start_step:
          tb.session_start(self.start_step + 1)
        tb.write_config(config, step=self.start_step)
      except OSError as e:  # a full disk at a resume: metrics.jsonl as it was
        error = loop_lib._workdir_error(self.workdir, e, ckpt)  # pylint: disable=protected-access
        ckpt.close(quiet=True)
        raise error from e
      self.writer = writers_lib.MultiWriter([jsonl, tb])
    self.bar = writers_lib.ProgressBar(self.total_steps,
                                       initial=self.start_step,
                                       stream=self.stream,
                                       enabled=self.is_main)
    self._init_loop_state()

  def _init_from(self, init_from):
    """A fresh run's weights from init_from.path (fine-tuning, upcycling)."""
    try:
      self.state, report = init_from_lib.fill_state(
          self.graphdef, self.state, init_from)
    except BaseException:
      self.ckpt.close(quiet=True)
      raise
    self._print(
        f"initialised from {init_from.path} (mode {init_from.get('mode')}): "
        f"{len(report['copied'])} variables copied, "
        f"{len(report['broadcast'])} upcycled into experts, "
        f"{len(report['initialised'])} left at their initialisation")

  def _init_loop_state(self):
    self.eval_batches = None
    self.window = []  # recent flat train metrics, for the summary
    self.window_size = max(1, min(50, self.total_steps // 10 or 1))
    self.log_every = max(1, int(self.config.get("log_every", 1)))
    self.train_time = 0.0  # this invocation's share of timing[...]
    self.timed_tokens = 0
    self.compile_time = 0.0
    self.num_devices = jax.device_count()
    self.last_eval = {}
    self.last_time = time.monotonic()
    self.last_tokens = self.tokens_seen
    self.compiled = False
    self.mfu_label = ("MFU (measured peak)" if self.peak.measured
                      else "MFU")
    self.profiling = False
    self.tokens_per_step = 1
    self.pending = None  # (step, metrics, tokens seen, log) to fetch
    self.saved = {self.start_step}
    self.unsaved = set()  # steps save() left alone (an unreadable exists)
    self.done = self.start_step  # steps whose update has been applied
    self.checked = self.start_step  # the last step whose metrics were seen
    self.latest = None  # the metrics of step `done`

  # ----------------------------------------------------------- evaluate

  def evaluate(self, step):
    """Evaluates the state at `step` on the eval batches (read once, then
    kept); writes and shows the metrics; returns them flat ('eval/...')."""
    config = self.config
    if self.eval_ds is None:
      return {}
    if self.eval_batches is None:
      it = iter(self.eval_ds)
      n = config.eval_steps or None
      try:
        host_batches = list(itertools.islice(it, n))
      except Exception as e:  # pylint: disable=broad-except
        self._stop_for_data("evaluation", e)  # saves, names the file
      self.eval_batches = [data_lib.make_global_batch(b, self.bsharding)
                           for b in host_batches]
    m = step_lib.evaluate(self.eval_step, self.state, self.eval_batches)
    flat = loop_lib._flatten_metrics(m, self.moe_layer_ids, "eval/")  # pylint: disable=protected-access
    if config.task == "lm" and "eval/ce_loss" in flat:
      flat["eval/perplexity"] = float(math.exp(min(flat["eval/ce_loss"],
                                                   50)))
    if self.writer is not None:
      self.writer.write(step, flat)
      self.writer.flush()
    shown = {k[len("eval/"):]: v for k, v in flat.items()
             if k in ("eval/ce_loss", "eval/perplexity", "eval/accuracy")}
    self.bar.write(f"eval @ {step}: " + "  ".join(
        f"{k} {v:.4f}" for k, v in shown.items()))
    return flat

  # ----------------------------------------------------------- checkpoint

  def run_timing(self):
    """The run's timing totals, this invocation's included (checkpoint
    meta and summary)."""
    t = self.timing
    return dict(train_time_s=t["train_time_s"] + self.train_time,
                timed_tokens=t["timed_tokens"] + self.timed_tokens,
                compile_time_s=t["compile_time_s"] + self.compile_time)

  def checkpoint(self, step, position=None):
    """Saves `step` (state, data position, meta). position: the data
    position to save instead of train_iter's (after a failed read, the one
    before it)."""
    position = self.train_iter if position is None else position
    skips = self.skips
    if not self.ckpt.save(step, self.state, position, {
        "tokens_seen": self.tokens_seen,
        "config": loop_lib._config_dict(self.config),  # pylint: disable=protected-access
        "nan_skips_total": skips["total"],
        "nan_skips_in_a_row": skips["in_a_row"], **self.run_timing()}):
      self.bar.write(f"WARNING: checkpoint step {step} not saved: "
                     f"{self.ckpt.step_path(step)} exists and could not be "
                     f"read; left it as it is")
      self.unsaved.add(step)
    self.saved.add(step)

  # ----------------------------------------------------------- train

  def _process(self, pending):
    """Fetches one step's metrics (waiting for the step), checks, writes."""
    step, metrics, seen, log = pending
    host = jax.device_get(metrics)
    self.checked = step
    self.ckpt.check()  # a failed async save stops the run at the next step
    if self._nonfinite_step(step, host):
      return  # skipped: counted and reported; its metrics are not logged
    if not log:
      return
    now = time.monotonic()
    dt, tokens = now - self.last_time, seen - self.last_tokens
    self.last_time, self.last_tokens = now, seen
    if self.compiled:
      self.train_time += dt
      self.timed_tokens += tokens
    else:
      self.compile_time += dt
    self.compiled = True
    flat = loop_lib._flatten_metrics(host, self.moe_layer_ids, "train/")  # pylint: disable=protected-access
    flat["train/step_time"] = dt * self.tokens_per_step / max(tokens, 1)
    flat["train/tokens_per_sec"] = tokens / dt if dt > 0 else 0.0
    tflops, mfu = throughput.step_rates(self.flops, tokens, dt, self.peak,
                                        self.num_devices)
    flat["train/tflops_per_sec"] = tflops
    flat["train/mfu"] = mfu
    flat["train/tokens_seen"] = float(seen)
    if self.skip_nonfinite:
      flat["train/nan_skips_total"] = float(self.skips["total"])
    if self.writer is not None:
      self.writer.write(step, flat)
    self.window.append(flat)
    if self.on_log is not None:
      self.on_log(step, flat)
    del self.window[:-self.window_size]
    self.bar.update(step, {"loss": flat["train/ce_loss"],
                           "lr": flat["train/learning_rate"],
                           "tok/s": int(flat["train/tokens_per_sec"]),
                           "TFLOP/s": f"{tflops:.3g}",
                           self.mfu_label: f"{mfu:.2%}"})

  def _so_far(self):
    latest = self.ckpt.latest_step()
    if latest is None:
      return f"No checkpoint has been saved yet (in {self.ckpt.directory})."
    return (f"Checkpoints so far are intact (latest: step {latest} in "
            f"{self.ckpt.directory}).")

  def _nonfinite_step(self, step, host):
    """Applies nan_policy to one step's host metrics; True if the step's
    update was skipped."""
    bad = [(n, float(host[n])) for n in loop_lib.FINITE_METRICS
           if not math.isfinite(float(host[n]))]
    skips = self.skips
    if not bad:
      skips["in_a_row"] = 0
      return False
    what = ", ".join(f"{n} is {v}" for n, v in bad)
    if not self.skip_nonfinite:
      self.ckpt.wait()
      raise TrainingDivergedError(
          f"step {step}: {what}; stopping (nan_policy='stop'). "
          f"{self._so_far()} To skip such steps instead, set "
          f"nan_policy='skip'.")
    skips["total"] += 1
    skips["in_a_row"] += 1
    if skips["in_a_row"] >= self.max_skips:
      self.ckpt.wait()
      raise TrainingDivergedError(
          f"step {step}: {what}; {skips['in_a_row']} steps in a row skipped "
          f"(max_consecutive_nan_skips={self.max_skips}, {skips['total']} "
          f"skipped in all); stopping. {self._so_far()}")
    self.bar.write(f"step {step}: {what}; update skipped "
                   f"({skips['in_a_row']} in a row, {skips['total']} in all)")
    if self.writer is not None:
      self.writer.write(step, {"train/skipped": 1.0,
                               "train/nan_skips_total": float(skips["total"])})
    return True

  def _preempted(self, signum, step):
    """Saves `step` (if not saved yet), waits for the files, raises."""
    ckpt = self.ckpt
    name = signal.Signals(signum).name
    what = "interrupted" if signum == signal.SIGINT else "preempted"
    if step not in self.saved:
      if self.checked != step:  # never save a state whose numbers are unseen
        self._nonfinite_step(step, jax.device_get(self.latest))
      self.checkpoint(step)
    ckpt.wait()
    if self.writer is not None:
      self.writer.flush()
    if step == self.start_step:
      raise TrainingPreempted(
          f"{what} ({name}) before step {step + 1}: nothing new to save"
          + (f"; the newest checkpoint is step {step}" if step else "")
          + ". Run the same command to resume.", step, signum)
    if step in self.unsaved:  # an unreadable step of that number was left
      raise TrainingPreempted(
          f"{what} ({name}) at step {step}: not saved, because "
          f"{ckpt.step_path(step)} exists and could not be read; "
          f"{ckpt.newest()}. Run the same command to resume.", step, signum)
    raise TrainingPreempted(
        f"{what} ({name}) at step {step}: saved checkpoint "
        f"{ckpt.step_path(step)}. Run the same command to resume from step "
        f"{step}.", step, signum)

  def _stop_for_data(self, what, error, position=None):
    """A read of the `what` data raised `error`: saves the step reached (its
    numbers checked first; `position`: the data position before the failed
    read), then raises DatasetError naming the damaged file."""
    ckpt = self.ckpt
    if self.pending is not None:  # the previous step: checked, logged first
      self._process(self.pending)
      self.pending = None
    step = self.done
    if step in self.saved:  # by a periodic save, or the step resumed from
      outcome = (f"saved checkpoint {ckpt.step_path(step)}" if step
                 else "no step was completed, so nothing was saved")
    elif jax.process_count() > 1:
      outcome = (f"step {step} was not saved (a save needs every process); "
                 f"{ckpt.newest()}")
    else:
      if self.checked != step:  # never save a state whose numbers are unseen
        self._nonfinite_step(step, jax.device_get(self.latest))
      self.checkpoint(step, position)
      outcome = (f"saved checkpoint {ckpt.step_path(step)}"
                 if step not in self.unsaved else
                 f"step {step} was not saved ({ckpt.step_path(step)} exists "
                 f"and could not be read); {ckpt.newest()}")
    ckpt.wait()
    if self.writer is not None:
      self.writer.flush()
    raise loop_lib._data_read_error(self.config, what, error, step, outcome)  # pylint: disable=protected-access

  def _profile(self, step, metrics=None):
    """Starts the jax.profiler trace before the first of profile_steps
    (metrics None) and stops it after the last."""
    steps = self.profile_steps
    if not steps or not self.is_main:
      return
    if metrics is None and step == steps[0]:
      jax.profiler.start_trace(os.path.join(self.workdir, "profile"))
      self.profiling = True
    elif metrics is not None and self.profiling and step >= steps[-1]:
      jax.block_until_ready(metrics)
      jax.profiler.stop_trace()
      self.profiling = False
      self.bar.write(f"profile of steps {steps[0]}-{step} written to "
                     f"{os.path.join(self.workdir, 'profile')} (TensorBoard's "
                     f"profile tab, or Perfetto)")

  def _one_step(self, guard, i, end_step):
    """Runs update i + 1: reads a batch, steps, fetches the previous step's
    metrics, evaluates and checkpoints when due."""
    config = self.config
    step = i + 1  # the number of updates once this one is applied
    position = self.train_iter.get_state()  # saved if the next read fails
    try:
      host_batch = next(self.train_iter)
    except Exception as e:  # pylint: disable=broad-except
      self._stop_for_data("training", e, loop_lib._DataPosition(position))  # pylint: disable=protected-access
    batch = data_lib.make_global_batch(host_batch, self.bsharding)
    self.tokens_per_step = self.task.tokens(batch)
    self.tokens_seen += self.tokens_per_step
    self._profile(step)
    self.state, metrics = self.train_step(self.state, batch)
    self._profile(step, metrics)
    self.done, self.latest = step, metrics
    if self.pending is not None:  # fetch the previous step while this runs
      self._process(self.pending)
      self.pending = None
    due_ckpt = bool(config.checkpoint_every and
                    step % config.checkpoint_every == 0) or step == end_step
    due_eval = bool(config.eval_every and step % config.eval_every == 0) or (
        step == self.total_steps)
    log = step % self.log_every == 0 or due_ckpt or due_eval
    if log or self.skip_nonfinite:
      self.pending = (step, metrics, self.tokens_seen, log)
    if due_ckpt or due_eval:
      # Check this step's numbers before its state is saved or evaluated.
      self._process(self.pending)
      self.pending = None
      if due_eval:
        self.last_eval = self.evaluate(step)
      if due_ckpt:
        self.checkpoint(step)
      self.last_time = time.monotonic()  # eval/ckpt time is not step time
    guard.poll(step)  # several processes: stop at an agreed step

  def train(self):
    """The loop from the restored step to num_train_steps (or
    stop_after_steps more), under a PreemptionGuard: SIGTERM/SIGINT save
    the current step and raise TrainingPreempted. A run that had already
    finished is neither trained nor evaluated again."""
    config, ckpt = self.config, self.ckpt
    failed = True
    try:
      with loop_lib.PreemptionGuard() as guard:
        stop_after = int(config.get("stop_after_steps", 0) or 0)
        end_step = (min(self.total_steps, self.start_step + stop_after)
                    if stop_after else self.total_steps)
        for i in range(self.start_step, end_step):
          if guard.requested:
            break
          self._one_step(guard, i, end_step)
        if self.pending is not None:
          self._process(self.pending)
          self.pending = None
        if guard.requested and self.done < end_step:  # a finished run ends
          self._preempted(guard.requested, self.done)
      if self.start_step >= self.total_steps:
        # Finished before this invocation: neither train nor evaluate again
        # (an eval would append another record each rerun). The same choice
        # on every process (an eval is a collective); the summary takes the
        # eval record of that step from metrics.jsonl.
        self.bar.write(
            f"this run already finished at step {self.start_step} "
            f"(num_train_steps={self.total_steps}, checkpoint "
            f"{ckpt.step_path(self.start_step)}): nothing was trained or "
            f"evaluated again, and the summary below is from its records. "
            f"Raise --config.num_train_steps to train on, or use a new "
            f"--workdir.")
        if self.is_main:
          self.last_eval = loop_lib._eval_record(self.workdir,  # pylint: disable=protected-access
                                                 self.start_step)
      failed = False
    except OSError as e:
      if isinstance(e, TrainingError):
        raise
      ckpt.wait()  # a failed save explains a full disk better: raise it 1st
      raise loop_lib._workdir_error(self.workdir, e, ckpt) from e  # pylint: disable=protected-access
    finally:
      if self.profiling:
        jax.profiler.stop_trace()
        self.profiling = False
      self.bar.close()
      loop_lib._close_outputs(ckpt, self.writer, self.workdir, quiet=failed)  # pylint: disable=protected-access

  # ----------------------------------------------------------- summary

  def summary(self):
    """The run's summary dict (losses, eval, timing, MoE layer table);
    written to workdir/summary.json and printed by process 0."""
    config, workdir = self.config, self.workdir
    window = self.window
    if not window and os.path.exists(os.path.join(workdir, "metrics.jsonl")):
      # Nothing trained in this invocation (the run had finished):
      # summarise the last steps logged.
      window = [r for r in writers_lib.read_jsonl(
          os.path.join(workdir, "metrics.jsonl")) if "train/loss" in r]
      window = window[-self.window_size:]
    totals = self.run_timing()
    summary = dict(
        workdir=workdir, task=config.task,
        step=int(jax.device_get(self.state.step)),
        tokens_seen=self.tokens_seen, train_time_s=totals["train_time_s"],
        compile_time_s=totals["compile_time_s"],
        tokens_per_sec=(totals["timed_tokens"] / totals["train_time_s"]
                        if totals["train_time_s"] else 0.0),
        params_total=self.counts["total"],
        params_active=self.counts["active"],
        flops_per_token=self.flops, window=len(window),
        nan_skips_total=self.skips["total"])
    if window:
      for key in ("ce_loss", "loss", "accuracy"):
        summary[f"train_{key}"] = float(np.mean(
            [m[f"train/{key}"] for m in window]))
      summary["moe_layers"] = loop_lib._layer_table(window,  # pylint: disable=protected-access
                                                    self.moe_layer_ids)
    old_summary = os.path.join(workdir, "summary.json")
    if not self.train_time and os.path.exists(old_summary):
      # Nothing trained in this invocation: keep the timing of the run.
      with open(old_summary) as f:
        old = json.load(f)
      for key in ("train_time_s", "tokens_per_sec", "compile_time_s"):
        summary[key] = old.get(key, summary.get(key))
    for key in ("ce_loss", "loss", "perplexity", "accuracy"):
      if f"eval/{key}" in self.last_eval:
        summary[f"eval_{key}"] = self.last_eval[f"eval/{key}"]
    baseline = None
    base_dir = config.get("baseline_workdir")
    if base_dir and os.path.exists(os.path.join(base_dir, "summary.json")):
      with open(os.path.join(base_dir, "summary.json")) as f:
        baseline = json.load(f)
    if self.is_main:
      ckpt_lib.write_json_atomic(os.path.join(workdir, "summary.json"),
                                 summary)
      self._print(loop_lib.format_summary(summary, baseline))
    return summary

  def run(self):
    """setup, restore, train, summary; returns the summary."""
    self.setup()
    self.restore()
    self.train()
    return self.summary()
