"""experiments/seed_stats.py: seed means, paired differences, the t test
verdict (hand-computed), and the report's seeds.md / paired.png."""

import math
import pathlib
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
  sys.path.insert(0, str(ROOT))

from experiments import seed_stats  # noqa: E402  pylint: disable=g-import-not-at-top


def _rows(name, losses, seeds=(0, 1, 2), **extra):
  return [dict(run=f"{name},seed={s}", config_arg=name, seed=s,
               eval_ce_loss=v, **extra) for s, v in zip(seeds, losses)]


def test_paired_differences_and_t_by_hand():
  # base: 2.00 2.10 1.90 (seed sd 0.1); a: base - 0.01, -0.02, -0.03.
  rows = (_rows("base", [2.00, 2.10, 1.90], mean_k=2.0)
          + _rows("a", [1.99, 2.08, 1.87], mean_k=1.0)
          + _rows("b", [2.01, 2.09, 1.90]))
  groups = seed_stats.pair_with(seed_stats.group_by_seed(rows), "base")
  a = groups["a"]
  assert a.paired == pytest.approx([-0.01, -0.02, -0.03])
  assert a.paired_mean == pytest.approx(-0.02)
  assert a.paired_sd == pytest.approx(0.01)
  # t = -0.02 / (0.01 / sqrt 3) = -3.46 < 4.30 on 2 dof: within spread.
  assert a.t == pytest.approx(-0.02 / (0.01 / math.sqrt(3)))
  assert a.verdict == "within spread"
  assert groups["base"].sd == pytest.approx(0.1)
  assert a.means["mean_k"] == 1.0
  # b: +0.01, -0.01, 0.00: mixed signs.
  assert groups["b"].verdict == "within spread"
  assert groups["base"].paired == [] and groups["base"].verdict == ""


def test_verdict_beyond_spread_needs_one_sign_and_large_t():
  rows = (_rows("base", [2.0, 2.1, 1.9])
          + _rows("worse", [2.05, 2.151, 1.949])    # +0.050 +0.051 +0.049
          + _rows("better", [1.75, 1.75, 1.5]))     # -0.25 -0.35 -0.40
  groups = seed_stats.pair_with(seed_stats.group_by_seed(rows), "base")
  assert groups["worse"].verdict == "worse"
  assert groups["worse"].t == pytest.approx(50 * math.sqrt(3), rel=1e-6)
  assert groups["better"].verdict == "better"
  # mean -1/3, sd 0.0764: t = -7.56 beyond -4.30.
  assert groups["better"].t == pytest.approx(-7.559, abs=1e-3)
  # Exactly equal differences (representable): sd 0, t infinite.
  rows = _rows("base", [2.0, 2.5, 1.5]) + _rows("c", [1.75, 2.25, 1.25])
  groups = seed_stats.pair_with(seed_stats.group_by_seed(rows), "base")
  assert groups["c"].t == -math.inf and groups["c"].verdict == "better"


def test_pairs_only_common_seeds_and_one_seed_has_no_verdict():
  rows = _rows("base", [2.0, 2.1, 1.9]) + _rows("a", [2.2], seeds=(1,))
  groups = seed_stats.pair_with(seed_stats.group_by_seed(rows), "base")
  assert groups["a"].paired == pytest.approx([0.1])
  assert groups["a"].t is None and groups["a"].verdict == ""
  assert groups["a"].sd is None


def test_rows_without_a_loss_or_unfinished_are_skipped_and_errors_name_the_value():
  rows = _rows("base", [2.0, 2.1, None]) + [dict(
      run="base,seed=3", config_arg="base", seed=3, eval_ce_loss=2.5,
      status="unfinished")]
  groups = seed_stats.group_by_seed(rows)
  assert groups["base"].seeds == [0, 1]
  with pytest.raises(ValueError, match="baseline 'top9' is not among"):
    seed_stats.pair_with(groups, "top9")
  with pytest.raises(ValueError, match="seed 0 twice"):
    seed_stats.group_by_seed(_rows("a", [1.0]) + _rows("a", [1.1]))


def test_markdown_and_figure(tmp_path):
  pytest.importorskip("matplotlib")
  rows = (_rows("base", [2.0, 2.5, 1.5], tokens_per_sec=1000.0)
          + _rows("a", [1.75, 2.25, 1.25], tokens_per_sec=500.0))
  groups = seed_stats.pair_with(seed_stats.group_by_seed(rows), "base")
  md = seed_stats.markdown(groups, "base")
  lines = md.splitlines()
  assert lines[2].startswith("| `base` | 0,1,2 | 2.0000 ± 0.5000 |")
  assert "| -0.2500 -0.2500 -0.2500 | -0.2500 ± 0.0000 | -inf | better |" \
      in lines[3]
  assert "| 500 |" in lines[3]
  path = seed_stats.plot_paired(groups, "base", str(tmp_path / "p.png"))
  assert pathlib.Path(path).stat().st_size > 1000


def test_short_names_drop_the_shared_parts():
  names = ["router=top2,size=s1000", "router=dense,size=s1000",
           "router=mod,size=s1000"]
  assert list(seed_stats.short_names(names).values()) == [
      "top2", "dense", "mod"]
  # Nothing shared: the names stay.
  assert seed_stats.short_names(["a,b=1", "c,b=2"]) == {
      "a,b=1": "a,b=1", "c,b=2": "c,b=2"}
