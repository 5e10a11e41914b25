"""Seed repeats of a sweep: each configuration's mean and sd over seeds, and
its paired difference from a baseline configuration.

Two runs with the same seed share the data order and the initialisation
seed (config.seed seeds both), so the difference `loss(run, s) -
loss(baseline, s)` cancels most of what makes one seed luckier than
another. A configuration differs from the baseline *beyond the seed
spread* when the paired differences all have one sign and the paired t
statistic, t = mean / (sd / sqrt(n)), exceeds the two-sided 95% critical
value of Student's t with n - 1 degrees of freedom (4.30 for 3 seeds).
The unpaired view (the difference of the means over the seed sd of the
two losses) is reported beside it; it is what a reader comparing single
runs of other papers would see.

Pure functions over result rows (dicts as experiments/sweep.py writes
them: a `config_arg`, a `seed` and the summary numbers); experiments/report.py
(--baseline) writes the table and the figure.
"""

import dataclasses
import math
import statistics

# Two-sided 95% critical values of Student's t by degrees of freedom.
T_CRIT_95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447,
             7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228}
# Columns averaged over seeds (the summary's names).
MEAN_COLUMNS = ("dropped_fraction", "max_over_mean_load", "router_entropy",
                "mean_k", "tokens_per_sec", "flops_per_token")


@dataclasses.dataclass
class SeedGroup:
  """One configuration over its seeds (`metric` per seed, seeds sorted)."""
  name: str
  seeds: list
  values: list
  means: dict
  paired: list = dataclasses.field(default_factory=list)  # - baseline, per seed

  @property
  def mean(self):
    return statistics.fmean(self.values)

  @property
  def sd(self):
    return statistics.stdev(self.values) if len(self.values) > 1 else None

  @property
  def paired_mean(self):
    return statistics.fmean(self.paired) if self.paired else None

  @property
  def paired_sd(self):
    return statistics.stdev(self.paired) if len(self.paired) > 1 else None

  @property
  def t(self):
    """The paired t statistic (None under 2 paired seeds; inf when the
    differences are identical and non-zero)."""
    if self.paired_sd is None:
      return None
    if self.paired_sd == 0:
      return math.copysign(math.inf, self.paired_mean) if self.paired_mean \
          else 0.0
    return self.paired_mean / (self.paired_sd / math.sqrt(len(self.paired)))

  @property
  def verdict(self):
    """'better' / 'worse' than the baseline beyond the seed spread (a lower
    metric is better), 'within spread', or '' without 2 paired seeds."""
    t = self.t
    if t is None:
      return ""
    same_sign = all(d < 0 for d in self.paired) or all(
        d > 0 for d in self.paired)
    if same_sign and abs(t) > T_CRIT_95.get(len(self.paired) - 1, 1.96):
      return "better" if t < 0 else "worse"
    return "within spread"


def group_by_seed(rows, metric="eval_ce_loss"):
  """{config_arg: SeedGroup} over finished rows (a `status` other than
  'finished' is skipped) with a finite `metric`, in first-seen order. A row's seed is its `seed` column (0 when absent); two rows with
  the same configuration and seed are an error (the pairing would be
  ambiguous)."""
  groups = {}
  for row in rows:
    value = _number(row.get(metric))
    # An unfinished run's summary holds its last eval, not its result.
    if value is None or row.get("status", "finished") != "finished":
      continue
    name = row.get("config_arg") or row["run"]
    seed = int(_number(row.get("seed")) or 0)
    g = groups.setdefault(name, SeedGroup(name, [], [], {}))
    if seed in g.seeds:
      raise ValueError(f"{name!r} has seed {seed} twice (rows "
                       f"{row['run']!r}); give each seed one run")
    g.seeds.append(seed)
    g.values.append(value)
    for col in MEAN_COLUMNS:
      g.means.setdefault(col, []).append(_number(row.get(col)))
  for g in groups.values():
    order = sorted(range(len(g.seeds)), key=g.seeds.__getitem__)
    g.seeds = [g.seeds[i] for i in order]
    g.values = [g.values[i] for i in order]
    g.means = {c: _mean([v[i] for i in order]) for c, v in g.means.items()}
  return groups


def pair_with(groups, baseline):
  """Fills each group's `paired` (value - the baseline's at the same seed,
  over the seeds both have). Returns the groups (the baseline's empty)."""
  if baseline not in groups:
    raise ValueError(f"baseline {baseline!r} is not among the runs; "
                     f"allowed: {sorted(groups)}")
  base = dict(zip(groups[baseline].seeds, groups[baseline].values))
  for name, g in groups.items():
    g.paired = ([] if name == baseline else
                [v - base[s] for s, v in zip(g.seeds, g.values) if s in base])
  return groups


def markdown(groups, baseline):
  """The seed table: one row per configuration (the baseline first)."""
  head = ["run", "seeds", "val loss (mean ± sd)", f"− {baseline} per seed",
          "paired mean ± sd", "t", "verdict", "dropped", "max/mean load",
          "entropy", "mean k", "tokens/s", "FLOPs/token"]
  lines = ["| " + " | ".join(head) + " |",
           "| " + " | ".join("---" for _ in head) + " |"]
  names = [baseline] + [n for n in groups if n != baseline]
  for name in names:
    g = groups[name]
    m = g.means
    cells = [
        f"`{name}`", ",".join(map(str, g.seeds)),
        f"{g.mean:.4f}" + (f" ± {g.sd:.4f}" if g.sd is not None else ""),
        " ".join(f"{d:+.4f}" for d in g.paired),
        (f"{g.paired_mean:+.4f}" if g.paired else "") +
        (f" ± {g.paired_sd:.4f}" if g.paired_sd is not None else ""),
        "" if g.t is None else f"{g.t:+.1f}", g.verdict,
        _fmt(m.get("dropped_fraction"), "{:.1%}"),
        _fmt(m.get("max_over_mean_load"), "{:.2f}"),
        _fmt(m.get("router_entropy"), "{:.3f}"),
        _fmt(m.get("mean_k"), "{:.2f}"),
        _fmt(m.get("tokens_per_sec"), "{:,.0f}"),
        _fmt(m.get("flops_per_token"), "{:,.0f}")]
    lines.append("| " + " | ".join(cells) + " |")
  return "\n".join(lines) + "\n"


def short_names(names):
  """Display names: the comma-separated parts every name shares are left
  out, and a lone `key=value` part shows its value ('router=top2,size=s1000'
  and 'router=dense,size=s1000' -> 'top2', 'dense')."""
  parts = [n.split(",") for n in names]
  common = set(parts[0]).intersection(*parts[1:]) if len(parts) > 1 else set()
  out = []
  for name, ps in zip(names, parts):
    kept = [p for p in ps if p not in common] or ps
    if len(kept) == 1 and "=" in kept[0]:
      kept = [kept[0].split("=", 1)[1]]
    out.append(",".join(kept) or name)
  return dict(zip(names, out))


def plot_paired(groups, baseline, path, dpi=100, metric_label="val loss"):
  """One dot per seed of each configuration's difference from the
  baseline, its mean ± sd as a bar coloured by the verdict, and the
  baseline's own seed-to-seed sd as a grey band (the unpaired spread).
  Returns the path written (None when nothing is paired)."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  names = [n for n in groups if n != baseline and groups[n].paired]
  names.sort(key=lambda n: groups[n].paired_mean)
  if not names:
    return None
  short = short_names([baseline] + names)
  base = short[baseline]
  with plt.rc_context({"font.size": 10, "legend.fontsize": 9}):
    fig, ax = plt.subplots(figsize=(7.5, 0.4 * len(names) + 2.4))
    base_sd = groups[baseline].sd
    if base_sd:
      ax.axvspan(-base_sd, base_sd, color="0.88", zorder=0,
                 label=f"± 1 sd of {base}'s loss over seeds (unpaired)")
    ax.axvline(0, color="0.3", lw=1)
    colors = {"better": "tab:green", "worse": "tab:red"}
    labels = {"better": f"mean ± sd: better than {base} (paired t, 95%)",
              "worse": f"mean ± sd: worse than {base} (paired t, 95%)",
              "within spread": "mean ± sd: within the seed spread",
              "": "one seed only"}
    labelled = set()
    for y, name in enumerate(names):
      g = groups[name]
      ax.errorbar(g.paired_mean, y, xerr=g.paired_sd or 0, fmt="s",
                  color=colors.get(g.verdict, "tab:blue"), capsize=3, ms=6,
                  label=None if g.verdict in labelled else labels[g.verdict])
      labelled.add(g.verdict)
      ax.plot(g.paired, [y] * len(g.paired), "o", mfc="none", color="0.2",
              ms=5, label=None if "seed" in labelled else "one seed's "
              "difference")
      labelled.add("seed")
    ax.set_yticks(range(len(names)), [short[n] for n in names])
    ax.invert_yaxis()
    ax.set_xlabel(f"{metric_label} − {base}'s at the same seed "
                  "(nats; < 0 is better)")
    ax.set_title(f"Paired difference from {base}")
    ax.grid(axis="x", color="0.8", lw=0.5)
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.16 - 0.5 / (
        len(names) + 2)), ncol=2, frameon=False)
    fig.tight_layout()
    fig.savefig(path, dpi=dpi, bbox_inches="tight")
    plt.close(fig)
  return path


def _number(value):
  try:
    x = float(value)
  except (TypeError, ValueError):
    return None
  return x if math.isfinite(x) else None


def _mean(values):
  values = [v for v in values if v is not None]
  return statistics.fmean(values) if values else None


def _fmt(value, spec):
  return "" if value is None else spec.format(value)
