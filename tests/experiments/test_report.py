"""experiments/report.py's figures, read back from the matplotlib figures
(path=None): a legend naming every line, LM and ViT runs in separate
panels, integer expert ticks, legible font sizes; and the PNGs on disk."""

import json
import math
import os
import pathlib
import sys

import pytest

pytest.importorskip("matplotlib")

ROOT = pathlib.Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
  sys.path.insert(0, str(ROOT))

from experiments import report  # noqa: E402  pylint: disable=g-import-not-at-top

STEPS = 20


def _workdir(base, name, task, num_experts, seed):
  """A workdir as experiments/train.py leaves it: config.json, a short
  metrics.jsonl (2 MoE layers, E experts) and summary.json."""
  path = base / name
  path.mkdir()
  moe = ({"experts": {"num_experts": num_experts}, "capacity_factor": 1.0}
         if num_experts else None)
  (path / "config.json").write_text(json.dumps(
      {"task": task, "moe": moe, "num_train_steps": STEPS}))
  lines = []
  for step in range(1, STEPS + 1):
    r = {"step": step, "train/ce_loss": 3.0 - 0.05 * step - 0.01 * seed}
    for layer in ((1, 3) if num_experts else ()):
      load = [1.0 / num_experts] * num_experts
      load[seed % num_experts] += 0.01
      total = sum(load)
      r[f"train/moe/layer{layer}/expert_load"] = [v / total for v in load]
      r[f"train/moe/layer{layer}/router_entropy"] = (
          math.log(num_experts) * (1 - 0.01 * step))
      r[f"train/moe/layer{layer}/dropped_fraction"] = 0.1
      r[f"train/moe/layer{layer}/max_over_mean_load"] = 1.1
    lines.append(json.dumps(r))
    if step % 10 == 0:
      lines.append(json.dumps({"step": step, "eval/ce_loss": r[
          "train/ce_loss"] + 0.1, "eval/loss": 1.0}))
  (path / "metrics.jsonl").write_text("\n".join(lines) + "\n")
  (path / "summary.json").write_text(json.dumps(
      {"step": STEPS, "task": task, "eval_ce_loss": 2.0 - 0.01 * seed}))
  return report.RunData(name, str(path))


@pytest.fixture()
def runs(tmp_path):
  lm = [_workdir(tmp_path, f"lm{i}", "lm", 4 if i else 0, i)
        for i in range(13)]  # 13 runs: the loss plot
  vit = [_workdir(tmp_path, f"vit{i}", "classification", 4, i)
         for i in range(3)]
  return lm + vit


def _legend(ax):
  legend = ax.get_legend()
  assert legend is not None, ax.get_title()
  return [t.get_text() for t in legend.get_texts()]


def test_loss_figure_names_every_line(runs):
  lm = [r for r in runs if r.task == "lm"]
  fig = report.plot_losses(lm, None)
  _, ax_v = fig.axes
  assert _legend(ax_v) == [r.name for r in lm]
  # Colours repeat after 10 only with another line style.
  styles = {(l.get_color(), l.get_linestyle()) for l in ax_v.get_lines()}
  assert len(styles) == len(lm)
  assert min(t.get_fontsize() for t in ax_v.get_legend().get_texts()) >= 9


def test_lm_and_vit_are_separate_panels(runs):
  fig = report.plot_router_entropy(runs, None)
  lm_ax, vit_ax = fig.axes
  assert lm_ax.get_title() == "language model"
  assert vit_ax.get_title() == "ViT (digits)"
  assert _legend(lm_ax) == [f"lm{i}" for i in range(1, 13)]  # lm0: dense
  assert _legend(vit_ax) == ["vit0", "vit1", "vit2"]
  fig = report.plot_final_losses(runs, None)
  titles = [ax.get_title() for ax in fig.axes]
  assert [t.split(": ")[1] for t in titles] == [
      "language model (lower is better)", "ViT (digits) (lower is better)"]
  lm_bars = [t.get_text() for t in fig.axes[0].get_yticklabels()]
  assert sorted(lm_bars) == sorted(f"lm{i}" for i in range(13))


def test_expert_ticks_are_integers_at_the_rows():
  assert report.expert_ticks(4) == ([0.5, 1.5, 2.5, 3.5],
                                    ["0", "1", "2", "3"])
  positions, labels = report.expert_ticks(64)
  assert labels == [str(e) for e in range(0, 64, 8)]
  assert positions == [e + 0.5 for e in range(0, 64, 8)]


def test_expert_load_heatmap_labels_each_expert(runs):
  fig = report.plot_expert_load(runs[1:3], None)
  heatmaps = [ax for ax in fig.axes if ax.get_ylabel() == "expert"]
  assert heatmaps
  for ax in heatmaps:
    assert [t.get_text() for t in ax.get_yticklabels()] == [
        "0", "1", "2", "3"]
    assert min(t.get_fontsize() for t in ax.get_yticklabels()) >= 9


def test_make_report_writes_every_png(runs, tmp_path):
  out = tmp_path / "report"
  written = report.make_report(runs, str(out))
  names = sorted(os.path.basename(p) for p in written)
  assert names == sorted([
      "loss_lm.png", "loss_classification.png", "final_loss.png",
      "expert_load.png", "dropped_vs_cf.png", "router_entropy.png",
      "results.csv", "results.md"])
  for name in names:
    if name.endswith(".png"):
      data = (out / name).read_bytes()
      assert data.startswith(b"\x89PNG") and 1000 < len(data) < 400_000, name


def test_plot_runs_limit_the_figures_not_the_tables(runs, tmp_path):
  out = tmp_path / "report"
  written = report.make_report(runs, str(out), plot_runs=r"^lm[0-2]$",
                               baseline="lm1")
  names = {os.path.basename(p) for p in written}
  # No ViT run drawn: no ViT loss figure; every run is in the tables.
  assert "loss_lm.png" in names and "loss_classification.png" not in names
  assert {"seeds.md", "paired.png"} <= names
  rows = (out / "results.md").read_text().splitlines()[2:]
  assert len(rows) == len(runs)
  seeds = (out / "seeds.md").read_text()
  assert seeds.splitlines()[2].startswith("| `lm1` |")
  assert seeds.count("\n") == len(runs) + 2
