r"""Figures and a results table from training workdirs (matplotlib, no display).

  python -m experiments.report --sweep_dir=workdirs/router_study \
      --out_dir=docs/figures/router_study
  python -m experiments.report --workdirs=workdirs/a,workdirs/b --out_dir=out
  python -m experiments.report --sweep_dir=workdirs/s0,workdirs/s1 \
      --baseline='router=top2,size=s500' --out_dir=out

Inputs: a sweep directory (its sweep.json lists the runs and their
overrides; experiments/sweep.py writes it) and/or workdirs given directly.
A workdir needs metrics.jsonl, config.json and, once finished, summary.json
(experiments/train.py writes them).

Writes into --out_dir (PNG, --dpi 100 by default), one figure per
question, every line named by a legend, each task in its own figure or
panel:
  loss_<task>.png       train (smoothed) and validation loss over steps
  final_loss.png        the final validation loss of each run, sorted
                        (one panel per task)
  expert_load.png       per-layer expert-load heatmaps over training steps
                        (one row per MoE run, one column per MoE layer;
                        integer expert ticks)
  dropped_vs_cf.png     dropped fraction and validation loss against the
                        capacity factor, one line per router (dropless runs
                        as dashed lines)
  router_entropy.png    router entropy over training (mean over layers,
                        divided by ln E; ln(E*P) for Soft MoE's slots), one
                        panel per task
  results.md, results.csv  one row per run (as experiments/sweep.py)
  seeds.md, paired.png  with --baseline=<config arg>: each configuration's
                        mean ± sd over seeds, its paired difference from
                        the baseline per seed and whether it exceeds the
                        seed spread (experiments/seed_stats.py)

--runs=REGEX keeps the runs whose name matches; --plot_runs=REGEX the
runs drawn in the figures (not the tables); --load_runs=REGEX picks the
rows of expert_load.png. Needs matplotlib (the
`report` extra: pip install -e '.[report]').
"""

import functools
import json
import math
import os
import re

from absl import app
from absl import flags
from absl import logging

from experiments import seed_stats
from experiments import sweep as sweep_lib

_SWEEP_DIR = flags.DEFINE_list(
    "sweep_dir", [], "Sweep directories (with sweep.json; comma-separated).")
_WORKDIRS = flags.DEFINE_list(
    "workdirs", [], "Training workdirs (comma-separated), besides the "
    "sweep's runs.")
_OUT_DIR = flags.DEFINE_string(
    "out_dir", None, "Where the figures and tables go (default: "
    "<sweep_dir>/report, or ./report).")
_RUNS = flags.DEFINE_string(
    "runs", None, "Regex: keep only the runs whose name matches (search).")
_LOAD_RUNS = flags.DEFINE_string(
    "load_runs", None, "Regex: the runs drawn in expert_load.png (default: "
    "every MoE run kept by --runs).")
_BASELINE = flags.DEFINE_string(
    "baseline", None, "A config arg (e.g. 'router=top2,size=s500'): also "
    "write seeds.md and paired.png, every configuration's mean over seeds "
    "and its paired difference from this one (experiments/seed_stats.py).")
_PLOT_RUNS = flags.DEFINE_string(
    "plot_runs", None, "Regex: the runs drawn in the loss/load/entropy/"
    "dropped figures (default: all); the tables and paired.png keep every "
    "run kept by --runs.")
_DPI = flags.DEFINE_integer("dpi", 100, "PNG resolution (at 100, 10 pt "
                            "text is ~14 px).", lower_bound=20)

MOE_PREFIX = "train/moe/layer"


def _is_dropless(run):
  """Whether the run's engine routes without capacity (nothing dropped):
  the engine class's own `uses_capacity`, via the one registry."""
  from moejax.layers import build  # pylint: disable=g-import-not-at-top
  try:
    return not build.resolve(run.engine, build.ENGINES,
                             "engine").uses_capacity
  except ValueError:
    return False


# ------------------------------------------------------------- loading


def _float(value):
  if isinstance(value, str):
    try:
      return float(value)  # 'nan', 'inf' as JSONL writes them
    except ValueError:
      return None
  return value


def read_metrics(workdir):
  """metrics.jsonl as a list of dicts (NaN/Inf strings as floats)."""
  path = os.path.join(workdir, "metrics.jsonl")
  out = []
  if not os.path.exists(path):
    return out
  with open(path) as f:
    for line in f:
      line = line.strip()
      if not line:
        continue
      try:
        record = json.loads(line)
      except ValueError:
        continue  # a line cut by a crash
      out.append({k: _float(v) if not isinstance(v, list) else v
                  for k, v in record.items()})
  return out


class RunData:
  """One run: its name, overrides, config, summary and metrics."""

  def __init__(self, name, workdir, point=None):
    self.name = name
    self.workdir = workdir
    self.point = dict(point or {})
    self.config = sweep_lib.read_json(
        os.path.join(workdir, "config.json")) or {}
    self.summary = sweep_lib.read_summary(workdir)
    self.metrics = read_metrics(workdir)

  @property
  def task(self):
    return self.config.get("task") or (self.summary or {}).get("task", "?")

  def moe(self, key, default=None):
    """A field of the run's moe config by dotted name ('engine.name',
    'experts.num_experts'), or `default` when it is not set."""
    node = self.config.get("moe") or {}
    for part in key.split("."):
      if not isinstance(node, dict) or node.get(part) is None:
        return default
      node = node[part]
    return node

  @property
  def engine(self):
    """The MoE engine's name ('indices', 'dropless', ...), or None.
    (Workdirs written before the nested moe config had moe.engine = name.)"""
    engine = self.moe("engine")
    return engine if isinstance(engine, str) or engine is None else (
        self.moe("engine.name"))

  @property
  def num_experts(self):
    """E of the run's MoE layers (0 without). (Old flat configs:
    moe.num_experts.)"""
    return self.moe("experts.num_experts") or self.moe("num_experts") or 0

  @functools.cached_property
  def moe_layers(self):
    """Indices of the MoE layers that have per-layer metrics (sorted)."""
    layers = set()
    for record in self.metrics:
      for key in record:
        if key.startswith(MOE_PREFIX):
          layers.add(int(key[len(MOE_PREFIX):].split("/")[0]))
    return sorted(layers)

  def series(self, key):
    """(steps, values) of a scalar metric, skipping missing/non-finite."""
    steps, values = [], []
    for record in self.metrics:
      v = record.get(key)
      if isinstance(v, (int, float)) and math.isfinite(v):
        steps.append(record["step"])
        values.append(float(v))
    return steps, values

  def load_matrix(self, layer):
    """(steps, <float>[E, steps]) expert load of one layer over training."""
    key = f"{MOE_PREFIX}{layer}/expert_load"
    steps, cols = [], []
    for record in self.metrics:
      if isinstance(record.get(key), list):
        steps.append(record["step"])
        cols.append(record[key])
    if not cols:
      return [], None
    import numpy as np  # pylint: disable=g-import-not-at-top
    return steps, np.asarray(cols, dtype=float).T


def load_runs(sweep_dir=None, workdirs=(), runs_regex=None):
  """RunData for a sweep's runs (sweep.json) and extra workdirs."""
  runs = []
  if sweep_dir:
    manifest = sweep_lib.read_json(os.path.join(sweep_dir, "sweep.json"))
    if manifest is None:
      raise ValueError(f"{sweep_dir} has no sweep.json (run "
                       f"experiments/sweep.py first, or pass --workdirs)")
    for r in manifest["runs"]:
      workdir = r["workdir"]
      if not os.path.isabs(workdir) and not os.path.exists(workdir):
        workdir = os.path.join(sweep_dir, r["name"])
      runs.append(RunData(r["name"], workdir, r.get("point")))
  for workdir in workdirs:
    runs.append(RunData(os.path.basename(os.path.normpath(workdir)),
                        workdir))
  if runs_regex:
    runs = [r for r in runs if re.search(runs_regex, r.name)]
  return [r for r in runs if r.metrics or r.summary]


# ------------------------------------------------------------- figures


# Sizes in points; at the default --dpi=100 a 10 pt label is ~14 px tall,
# legible at 100% zoom.
FONT = {"font.size": 10, "axes.titlesize": 11, "axes.labelsize": 10,
        "xtick.labelsize": 9, "ytick.labelsize": 9, "legend.fontsize": 9,
        "figure.titlesize": 12}
TASK_TITLES = {"lm": "language model", "classification": "ViT (digits)"}


def _plt():
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  plt.rcParams.update(FONT)
  return plt


def smooth(values, window):
  """Trailing moving average (the first points average what there is)."""
  out, total = [], 0.0
  for i, v in enumerate(values):
    total += v
    if i >= window:
      total -= values[i - window]
    out.append(total / min(i + 1, window))
  return out


def _save(fig, path, dpi):
  """Writes `fig` to `path` and returns the path; path None: returns the
  figure itself, open (for tests and notebooks)."""
  if path is None:
    return fig
  fig.savefig(path, dpi=dpi, bbox_inches="tight")
  _plt().close(fig)
  return path


def _colors(n):
  plt = _plt()
  cmap = plt.get_cmap("tab20" if n > 10 else "tab10")
  return [cmap(i % cmap.N) for i in range(n)]


def _styles(runs):
  """{run name: (colour, line style)}: up to 10 colours, then the same
  colours dashed, then dotted, so a legend entry names one line."""
  cmap = _plt().get_cmap("tab10")
  dashes = ["-", "--", ":", "-."]
  return {r.name: (cmap(i % 10), dashes[(i // 10) % len(dashes)])
          for i, r in enumerate(runs)}


def _by_task(runs):
  """[(task, runs)] in a stable order: LM first, then the others."""
  tasks = {}
  for run in runs:
    tasks.setdefault(run.task, []).append(run)
  return sorted(tasks.items(), key=lambda kv: (kv[0] != "lm", kv[0]))


def _legend_right(ax, ncol=1):
  """The legend outside the axes on the right, one entry per line."""
  if ax.get_legend_handles_labels()[0]:
    ax.legend(loc="upper left", bbox_to_anchor=(1.02, 1.0), ncol=ncol,
              frameon=False, borderaxespad=0.0, handlelength=2.5)


def _zoom(ax, start_fraction):
  """Sets ax's y-limits to the lines' values after `start_fraction` of
  their x range (the start of training dwarfs the differences)."""
  ys = []
  for line in ax.get_lines():
    xs = list(line.get_xdata())
    if xs:
      cut = start_fraction * max(xs)
      ys += [y for x, y in zip(xs, line.get_ydata()) if x >= cut]
  if ys:
    lo, hi = min(ys), max(ys)
    pad = 0.05 * (hi - lo) + 1e-6
    ax.set_ylim(lo - pad, hi + pad)


def plot_losses(runs, path, dpi=100):
  """How does each run's loss evolve? Train loss (moving average) and
  validation loss against steps, one line per run (of one task), with a
  legend naming every line."""
  plt = _plt()
  styles = _styles(runs)
  fig, (ax_t, ax_v) = plt.subplots(
      1, 2, figsize=(12, 4.2 + 0.1 * max(0, len(runs) - 12)),
      layout="constrained", sharex=True)
  for run in runs:
    color, ls = styles[run.name]
    steps, values = run.series("train/ce_loss")
    if steps:
      window = max(1, len(values) // 25)
      ax_t.plot(steps, smooth(values, window), color=color, ls=ls, lw=1.4,
                label=run.name)
    steps, values = run.series("eval/ce_loss")
    if steps:
      ax_v.plot(steps, values, "o", color=color, ls=ls, lw=1.4, ms=4,
                label=run.name)
  title = TASK_TITLES.get(runs[0].task, runs[0].task) if runs else ""
  ax_t.set_title("train loss (moving average)")
  ax_v.set_title("validation loss")
  fig.suptitle(f"Loss over training: {title}")
  for ax in (ax_t, ax_v):
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy")
    ax.grid(alpha=0.3)
  _zoom(ax_t, 0.3)
  _zoom(ax_v, 0.3)
  _legend_right(ax_v)
  return _save(fig, path, dpi)


def plot_final_losses(runs, path, dpi=100):
  """Which run ends best? The final validation loss of every run, sorted,
  one panel per task, each bar labelled with its run and value."""
  plt = _plt()
  groups = []
  for task, members in _by_task(runs):
    finals = sorted((vals[-1], r.name) for r in members
                    for _, vals in [r.series("eval/ce_loss")] if vals)
    if finals:
      groups.append((task, finals))
  if not groups:
    return None
  heights = [0.8 + 0.32 * len(f) for _, f in groups]
  fig, axes = plt.subplots(len(groups), 1, squeeze=False,
                           figsize=(8, sum(heights) + 0.4),
                           gridspec_kw=dict(height_ratios=heights),
                           layout="constrained")
  for ax, (task, finals) in zip(axes[:, 0], groups):
    ys = list(range(len(finals)))
    ax.barh(ys, [v for v, _ in finals], color="tab:blue", alpha=0.75)
    ax.set_yticks(ys, [name for _, name in finals])
    ax.invert_yaxis()
    lo, hi = finals[0][0], finals[-1][0]
    pad = 0.1 * (hi - lo) + 1e-3
    ax.set_xlim(lo - 4 * pad, hi + 3 * pad)
    for y, (value, _) in zip(ys, finals):
      ax.text(value, y, f" {value:.4f}", va="center", fontsize=9)
    ax.set_title(f"final validation loss: {TASK_TITLES.get(task, task)} "
                 f"(lower is better)")
    ax.set_xlabel("cross-entropy")
    ax.grid(alpha=0.3, axis="x")
  return _save(fig, path, dpi)


def _bin_columns(steps, mat, max_bins):
  """Averages the columns of mat [E, T] into at most max_bins time bins;
  returns (bin edges in steps, binned mat)."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  t = mat.shape[1]
  n = min(t, max_bins)
  edges = np.linspace(0, t, n + 1).round().astype(int)
  binned = np.stack([mat[:, a:b].mean(axis=1)
                     for a, b in zip(edges[:-1], edges[1:])], axis=1)
  step_edges = [steps[0] - 0.5] + [steps[b - 1] + 0.5 for b in edges[1:]]
  return step_edges, binned


def expert_ticks(num_experts, max_ticks=8):
  """(tick positions, labels) for E experts drawn as rows [e, e + 1): at
  the row centres, integer labels, every k-th so at most `max_ticks`."""
  every = max(1, math.ceil(num_experts / max_ticks))
  experts = list(range(0, num_experts, every))
  return [e + 0.5 for e in experts], [str(e) for e in experts]


def plot_expert_load(runs, path, dpi=100, max_bins=60):
  """How evenly do the experts share the load over training? Heatmaps: one
  row per MoE run, one column per layer; x = step (averaged into at most
  `max_bins` bins), y = expert, colour = the expert's share of the kept
  assignments times E (1 = a uniform load)."""
  plt = _plt()
  from matplotlib import colors  # pylint: disable=g-import-not-at-top
  runs = [r for r in runs if r.moe_layers]
  if not runs:
    return None
  runs = [r for _, members in _by_task(runs) for r in members]
  ncols = max(len(r.moe_layers) for r in runs)
  fig, axes = plt.subplots(len(runs), ncols, squeeze=False,
                           figsize=(3.8 * ncols + 1.2, 0.6 + 1.55 * len(runs)),
                           layout="constrained")
  norm = colors.TwoSlopeNorm(vmin=0.0, vcenter=1.0, vmax=3.0)
  image = None
  for i, run in enumerate(runs):
    for j in range(ncols):
      ax = axes[i][j]
      steps, mat = (run.load_matrix(run.moe_layers[j])
                    if j < len(run.moe_layers) else ([], None))
      if mat is None:
        ax.axis("off")
        continue
      num_experts = mat.shape[0]
      edges, binned = _bin_columns(steps, mat * num_experts, max_bins)
      image = ax.pcolormesh(edges, range(num_experts + 1), binned,
                            cmap="RdBu_r", norm=norm, shading="flat")
      ax.invert_yaxis()
      ax.set_yticks(*expert_ticks(num_experts))
      ax.set_title(f"{run.name}: layer {run.moe_layers[j]}", fontsize=10)
      if j == 0:
        ax.set_ylabel("expert")
      if i == len(runs) - 1:
        ax.set_xlabel("step")
  if image is not None:
    fig.colorbar(image, ax=axes, fraction=0.03, pad=0.01, aspect=40,
                 label="expert load x E (1 = uniform)")
  return _save(fig, path, dpi)


def _router_label(run):
  """The run's name without its capacity-factor / engine overrides."""
  parts = [p for p in run.name.split(",")
           if not p.startswith(("moe.capacity_factor=", "moe.engine=",
                                "moe.engine."))]
  return ",".join(parts) or "default"


def plot_dropped_vs_cf(runs, path, dpi=100):
  """What does the capacity factor cost? Dropped fraction and validation
  loss against the capacity factor, one line per router (one legend for
  both panels).

  Runs group by their name without the capacity factor and engine; a group
  with two or more capacity factors is a line; its dropless run (engine
  'dropless' or 'pallas') is a dashed horizontal line.
  """
  plt = _plt()
  groups = {}
  for run in runs:
    if not run.summary or not run.moe_layers:
      continue
    groups.setdefault(_router_label(run), []).append(run)
  fig, (ax_d, ax_l) = plt.subplots(1, 2, figsize=(11, 4.2),
                                   layout="constrained")
  lines = []  # (label, runs with a capacity factor, dropless runs)
  for label, members in groups.items():
    capped = sorted(
        [r for r in members if not _is_dropless(r)
         and r.moe("capacity_factor") is not None],
        key=lambda r: r.moe("capacity_factor"))
    if len({r.moe("capacity_factor") for r in capped}) >= 2:
      lines.append((label, capped,
                    [r for r in members if _is_dropless(r)]))
  drawn = bool(lines)
  # Colours for the drawn groups only: distinct, saturated tab10 ones.
  for (label, capped, dropless), color in zip(lines, _colors(len(lines))):
    cfs = [r.moe("capacity_factor") for r in capped]
    ax_d.plot(cfs, [sweep_lib.layer_mean(r.summary, "dropped_fraction")
                    for r in capped], "o-", color=color, lw=1.6)
    ax_l.plot(cfs, [r.summary.get("eval_ce_loss") for r in capped], "o-",
              color=color, lw=1.6, label=f"{label}")
    for r in dropless:
      loss = r.summary.get("eval_ce_loss")
      if loss is not None:
        ax_l.axhline(loss, color=color, ls="--", lw=1.2,
                     label=f"{label}, dropless")
  ax_d.set_xlabel("capacity factor")
  ax_d.set_ylabel("dropped fraction (train)")
  ax_d.set_title("dropped assignments")
  ax_l.set_xlabel("capacity factor")
  ax_l.set_ylabel("validation loss")
  ax_l.set_title("validation loss (dashed: dropless)")
  fig.suptitle("Capacity factor: tokens dropped and what they cost")
  for ax in (ax_d, ax_l):
    ax.grid(alpha=0.3)
  if drawn:
    _legend_right(ax_l)
  else:
    ax_d.text(0.5, 0.5, "no run group with 2+ capacity factors",
              ha="center", transform=ax_d.transAxes)
  return _save(fig, path, dpi)


def _num_choices(run):
  """What the router chooses among: E experts, or E*P slots (Soft MoE)."""
  return run.num_experts * (run.moe("slots_per_expert") or 1)


def plot_router_entropy(runs, path, dpi=100):
  """How confident do the routers become? Router entropy over training
  steps (mean over MoE layers), divided by its maximum ln(E) (ln(E*P) for
  Soft MoE slots); one panel per task, each with its legend."""
  plt = _plt()
  groups = [(t, [r for r in m if r.moe_layers and _num_choices(r) >= 2])
            for t, m in _by_task(runs)]
  groups = [(t, m) for t, m in groups if m]
  if not groups:
    return None
  fig, axes = plt.subplots(1, len(groups), squeeze=False,
                           figsize=(6.2 * len(groups) + 2.5, 4.4),
                           layout="constrained")
  for ax, (task, members) in zip(axes[0], groups):
    styles = _styles(members)
    for run in members:
      per_layer = [dict(zip(*run.series(f"{MOE_PREFIX}{l}/router_entropy")))
                   for l in run.moe_layers]
      steps = sorted(set.intersection(*(set(d) for d in per_layer)))
      if not steps:
        continue
      n = _num_choices(run)
      values = [sum(d[s] for d in per_layer) / len(per_layer) / math.log(n)
                for s in steps]
      window = max(1, len(values) // 25)
      color, ls = styles[run.name]
      ax.plot(steps, smooth(values, window), color=color, ls=ls, lw=1.4,
              label=run.name)
    ax.set_xlabel("step")
    ax.set_ylabel("router entropy / ln E")
    ax.set_title(TASK_TITLES.get(task, task))
    ax.grid(alpha=0.3)
    _legend_right(ax)
  fig.suptitle("Router entropy over training (mean over layers; 1 = "
               "uniform)")
  return _save(fig, path, dpi)


def write_tables(runs, out_dir):
  """results.csv and results.md of `runs` (RunData) in out_dir; the rows."""
  rows = []
  for run in runs:
    fake = sweep_lib.Run(name=run.name, point=run.point, config_arg="",
                         workdir=run.workdir, argv=[],
                         total_steps=int(run.config.get("num_train_steps")
                                         or 0))
    rows.append(sweep_lib.result_row(fake))
  sweep_lib.write_csv(rows, os.path.join(out_dir, "results.csv"))
  with open(os.path.join(out_dir, "results.md"), "w") as f:
    f.write(sweep_lib.markdown_table(rows))
  return rows


def make_report(runs, out_dir, dpi=100, load_runs=None, baseline=None,
                plot_runs=None):
  """Writes every figure and the tables; returns the paths written.

  load_runs: a regex choosing the runs of expert_load.png (None: all).
  plot_runs: a regex choosing the runs drawn in the loss, load, entropy and
    dropped figures (None: all); the tables and paired.png keep every run
    (e.g. one seed's curves, every seed's statistics).
  baseline: a config arg; also writes seeds.md and paired.png (seed
    repeats paired against it, experiments/seed_stats.py).
  """
  if not runs:
    raise ValueError("no runs with metrics to report")
  os.makedirs(out_dir, exist_ok=True)
  written = []
  tasks = {}
  drawn = [r for r in runs if not plot_runs or re.search(plot_runs, r.name)]
  for run in drawn:
    tasks.setdefault(run.task, []).append(run)
  for task, members in tasks.items():
    written.append(plot_losses(members, os.path.join(out_dir,
                                                     f"loss_{task}.png"),
                               dpi))
  load = [r for r in drawn if not load_runs or re.search(load_runs, r.name)]
  for fn, chosen, name in (
      (plot_final_losses, drawn, "final_loss.png"),
      (plot_expert_load, load, "expert_load.png"),
      (plot_dropped_vs_cf, drawn, "dropped_vs_cf.png"),
      (plot_router_entropy, drawn, "router_entropy.png")):
    path = fn(chosen, os.path.join(out_dir, name), dpi)
    if path:
      written.append(path)
  rows = write_tables(runs, out_dir)
  written += [os.path.join(out_dir, "results.csv"),
              os.path.join(out_dir, "results.md")]
  if baseline:
    groups = seed_stats.pair_with(seed_stats.group_by_seed(rows), baseline)
    with open(os.path.join(out_dir, "seeds.md"), "w") as f:
      f.write(seed_stats.markdown(groups, baseline))
    written.append(os.path.join(out_dir, "seeds.md"))
    path = seed_stats.plot_paired(groups, baseline,
                                  os.path.join(out_dir, "paired.png"), dpi)
    if path:
      written.append(path)
  return written


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if not _SWEEP_DIR.value and not _WORKDIRS.value:
    raise app.UsageError("give --sweep_dir and/or --workdirs")
  logging.set_verbosity(logging.WARNING)
  out_dir = _OUT_DIR.value or os.path.join(
      _SWEEP_DIR.value[0] if _SWEEP_DIR.value else ".", "report")
  runs = []
  for i, sweep_dir in enumerate(_SWEEP_DIR.value or [None]):
    runs += load_runs(sweep_dir, _WORKDIRS.value if i == 0 else (),
                      _RUNS.value)
  for path in make_report(runs, out_dir, _DPI.value, _LOAD_RUNS.value,
                          _BASELINE.value, _PLOT_RUNS.value):
    print(path)


if __name__ == "__main__":
  app.run(main)
