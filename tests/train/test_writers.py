"""TensorBoard event files (tensorboardX, read back by TensorBoard's own
EventAccumulator), JSONL metrics, and the tqdm progress bar."""

import io
import json
import os

import numpy as np
import pytest
from tensorboard.backend.event_processing import event_accumulator

from moejax.train import writers


def _accumulator(logdir):
  acc = event_accumulator.EventAccumulator(
      str(logdir), size_guidance={event_accumulator.SCALARS: 0,
                                  event_accumulator.HISTOGRAMS: 0,
                                  event_accumulator.TENSORS: 0})
  acc.Reload()
  return acc


def test_scalars_and_lists_round_trip(tmp_path):
  w = writers.TensorBoardWriter(str(tmp_path))
  w.write(1, {"train/loss": 2.5, "train/lr": 1e-3, "train/moe/layer1/x": [
      0.25, 0.75]})
  w.write(2, {"train/loss": 2.25})
  w.close()
  assert os.path.basename(w.path).startswith("events.out.tfevents.")
  assert os.path.dirname(w.path) == str(tmp_path)
  assert writers.read_scalars(str(tmp_path)) == {
      "train/loss": [(1, 2.5), (2, 2.25)],
      "train/lr": [(1, pytest.approx(1e-3))],
      "train/moe/layer1/x/0": [(1, 0.25)],
      "train/moe/layer1/x/1": [(1, 0.75)]}


def test_a_resumed_run_hides_the_steps_it_redoes(tmp_path, monkeypatch):
  """Two writers, two files; the second's SessionLog START at step 2 makes
  TensorBoard drop the first file's steps >= 2."""
  # The 9th and 10th writer of a process within one second: TensorBoard
  # reads files in name order, and '.10' sorts before '.9'.
  monkeypatch.setattr(writers.TensorBoardWriter, "_count", 8)
  w = writers.TensorBoardWriter(str(tmp_path))
  for step in (1, 2, 3):
    w.write(step, {"train/loss": 10.0 + step})
  w.close()
  resumed = writers.TensorBoardWriter(str(tmp_path))  # resumed from step 1
  resumed.session_start(2)
  resumed.write(2, {"train/loss": 2.5})
  resumed.close()
  assert resumed.path != w.path and len(os.listdir(tmp_path)) == 2
  assert writers.read_scalars(str(tmp_path))["train/loss"] == [
      (1, 11.0), (2, 2.5)]


def test_expert_load_histogram_per_layer(tmp_path):
  # E = 4 experts: bucket e spans (e - 0.5, e + 0.5] and holds load[e].
  load1_E, load3_E = [0.5, 0.25, 0.25, 0.0], [0.1, 0.2, 0.3, 0.4]
  w = writers.TensorBoardWriter(str(tmp_path))
  w.write(5, {"train/moe/layer1/expert_load": load1_E,
              "train/moe/layer3/expert_load": load3_E,
              "train/moe/layer1/router_entropy": 1.2})
  w.close()
  acc = _accumulator(tmp_path)
  assert sorted(acc.Tags()["histograms"]) == [
      "train/moe/layer1/expert_load", "train/moe/layer3/expert_load"]
  (h1,) = acc.Histograms("train/moe/layer1/expert_load")
  assert h1.step == 5
  v = h1.histogram_value
  assert list(v.bucket_limit) == [0.5, 1.5, 2.5, 3.5]
  np.testing.assert_allclose(v.bucket, load1_E)
  # min/max are the first and last expert that got tokens; num the total.
  assert (v.min, v.max, v.num) == (0.0, 2.0, 1.0)
  assert v.sum == pytest.approx(0.25 + 2 * 0.25)
  (h3,) = acc.Histograms("train/moe/layer3/expert_load")
  np.testing.assert_allclose(h3.histogram_value.bucket, load3_E)
  # The per-expert scalars stay as well.
  assert acc.Scalars("train/moe/layer3/expert_load/3")[0].value == (
      pytest.approx(0.4))


def test_config_as_text_and_hparams(tmp_path):
  config = {"model": {"num_experts": 4, "router": "top_k"},
            "learning_rate": 3e-4, "use_bias": False,
            "mesh_shape": (2, 4), "profile_steps": None}
  w = writers.TensorBoardWriter(str(tmp_path))
  w.write_config(config)
  w.close()
  acc = _accumulator(tmp_path)
  (text,) = acc.Tensors("config/text_summary")
  shown = text.tensor_proto.string_val[0].decode()
  assert all(line.startswith("    ") for line in shown.splitlines())
  assert json.loads(shown) == json.loads(json.dumps(config))
  hparams = acc.PluginTagToContent("hparams")
  assert set(hparams) == {"_hparams_/experiment",
                          "_hparams_/session_start_info",
                          "_hparams_/session_end_info"}
  from tensorboard.plugins.hparams import plugin_data_pb2  # pylint: disable=g-import-not-at-top
  start = plugin_data_pb2.HParamsPluginData.FromString(
      hparams["_hparams_/session_start_info"]).session_start_info
  values = {k: v.WhichOneof("kind") and getattr(v, v.WhichOneof("kind"))
            for k, v in start.hparams.items()}
  assert values == {"model.num_experts": 4.0, "model.router": "top_k",
                    "learning_rate": pytest.approx(3e-4), "use_bias": False,
                    "mesh_shape": "(2, 4)"}


def test_config_dict_is_accepted(tmp_path):
  ml_collections = pytest.importorskip("ml_collections")
  config = ml_collections.ConfigDict({"seed": 3, "moe": {"top_k": 2}})
  w = writers.TensorBoardWriter(str(tmp_path))
  w.write_config(config, step=7)
  w.close()
  (text,) = _accumulator(tmp_path).Tensors("config/text_summary")
  assert text.step == 7
  assert json.loads(text.tensor_proto.string_val[0].decode()) == {
      "seed": 3, "moe": {"top_k": 2}}


def test_jsonl_writer_lists_non_finite_and_truncate(tmp_path):
  path = str(tmp_path / "m.jsonl")
  w = writers.JsonlWriter(path)
  for step in (1, 2, 3):
    w.write(step, {"loss": 1.0 / step, "load": [0.25, 0.75],
                   "bad": float("nan")})
  w.close()
  records = writers.read_jsonl(path)
  assert [r["step"] for r in records] == [1, 2, 3]
  assert records[0]["load"] == [0.25, 0.75] and records[0]["bad"] == "nan"
  with open(path, "a") as f:
    f.write('{"step": 4, "lo')  # a line cut short by a kill
  writers.JsonlWriter(path).truncate_after(2)
  assert [r["step"] for r in writers.read_jsonl(path)] == [1, 2]


def test_progress_bar_plain_lines_when_not_a_terminal():
  out = io.StringIO()
  bar = writers.ProgressBar(10, stream=out, every=5)
  for step in range(1, 11):
    bar.update(step, {"loss": 1.0, "tokens/s": 512})
  bar.write("eval done")
  bar.close()
  text = out.getvalue()
  assert "\r" not in text and "\x1b" not in text
  lines = text.splitlines()
  assert len(lines) == 3
  assert [line.split("| ")[1].split()[0] for line in lines[:2]] == [
      "5/10", "10/10"]
  assert lines[0].startswith(" 50%|") and "loss 1 | tokens/s 512" in lines[0]
  assert lines[-1] == "eval done"


def test_progress_bar_eta_leaves_out_the_time_before_the_first_step(
    monkeypatch):
  now = [100.0]
  monkeypatch.setattr(writers.time, "monotonic", lambda: now[0])
  out = io.StringIO()
  bar = writers.ProgressBar(100, stream=out, every=10)
  now[0] += 60.0  # compiling: the first step reports a minute in
  bar.update(1, {})
  for step in range(2, 11):
    now[0] += 0.5  # then two steps a second
    bar.update(step, {})
  (line,) = out.getvalue().splitlines()
  # 90 steps left at 2 steps/s: 45 s, not ~10 minutes.
  assert "[01:04<00:45" in line, line


class _Terminal(io.StringIO):

  def isatty(self):
    return True


def test_terminal_eta_also_leaves_out_the_time_before_the_first_step(
    monkeypatch):
  now = [100.0]
  monkeypatch.setattr(writers.time, "monotonic", lambda: now[0])
  out = _Terminal()
  bar = writers.ProgressBar(100, stream=out)
  now[0] += 60.0
  bar.update(1, {})
  for step in range(2, 11):
    now[0] += 0.5
    bar.update(step, {})
  last = out.getvalue().split("\r")[-1]
  assert "10/100" in last and "<00:45" in last, last


def test_progress_bar_on_a_terminal_updates_one_line():
  out = _Terminal()
  bar = writers.ProgressBar(4, stream=out)
  for step in range(1, 5):
    bar.update(step, {"loss": 0.5})
  bar.write("eval @ 4: ce_loss 0.5")
  bar.close()
  text = out.getvalue()
  assert "\r" in text and "4/4" in text and "loss 0.5" in text
  assert "eval @ 4: ce_loss 0.5\n" in text
  assert text.endswith("\n")


def test_disabled_bar_prints_nothing():
  out = _Terminal()
  bar = writers.ProgressBar(4, stream=out, enabled=False)
  bar.update(4, {"loss": 1.0})
  bar.write("x")
  bar.close()
  assert out.getvalue() == ""
