"""TensorBoard event files (no TensorFlow), JSONL metrics, progress bar."""

import io
import os
import struct

import pytest

from moejax.train import tfevents
from moejax.train import writers


def test_crc32c_known_values():
  # RFC 3720 B.4 check value, and the empty string.
  assert tfevents.crc32c(b"123456789") == 0xE3069283
  assert tfevents.crc32c(b"") == 0
  assert tfevents.crc32c(bytes(32)) == 0x8A9136AA


def test_event_file_round_trip(tmp_path):
  w = tfevents.EventFileWriter(str(tmp_path))
  w.write_scalars(1, {"train/loss": 2.5, "train/lr": 1e-3})
  w.write_scalars(2, {"train/loss": 2.25})
  w.write_session_start(2)
  w.close()
  assert os.path.basename(w.path).startswith("events.out.tfevents.")
  events = tfevents.read_events(w.path)
  assert events[0]["file_version"] == "brain.Event:2"
  assert [e["step"] for e in events[1:]] == [1, 2, 2]
  assert events[1]["scalars"] == pytest.approx({"train/loss": 2.5,
                                                "train/lr": 1e-3})
  assert events[3]["session_log_status"] == tfevents.SESSION_LOG_START
  assert tfevents.read_scalars(str(tmp_path)) == {
      "train/loss": [(1, 2.5), (2, 2.25)],
      "train/lr": [(1, pytest.approx(1e-3))]}


def test_corrupt_record_raises_and_truncated_tail_is_ignored(tmp_path):
  w = tfevents.EventFileWriter(str(tmp_path))
  w.write_scalars(1, {"a": 1.0})
  w.close()
  data = open(w.path, "rb").read()
  cut = tmp_path / "cut" / "events.out.tfevents.cut"
  cut.parent.mkdir()
  cut.write_bytes(data[:-3])  # a writer killed mid-record
  assert len(tfevents.read_events(str(cut))) == 1
  bad = bytearray(data)
  bad[-6] ^= 0xFF  # flip a payload byte of the last record
  (tmp_path / "bad").write_bytes(bytes(bad))
  with pytest.raises(ValueError, match="corrupt"):
    tfevents.read_events(str(tmp_path / "bad"))


def test_record_framing_matches_the_tfrecord_format():
  data = tfevents.encode_event(wall_time=1.0, step=3, scalars={"x": 0.5})
  record = tfevents.encode_record(data)
  (length,) = struct.unpack("<Q", record[:8])
  assert length == len(data)
  assert struct.unpack("<I", record[8:12])[0] == tfevents.masked_crc32c(
      record[:8])
  assert record[12:12 + length] == data
  assert struct.unpack("<I", record[-4:])[0] == tfevents.masked_crc32c(data)


def test_tensorboard_reads_our_files_when_installed(tmp_path):
  """TensorBoard's own reader sees the scalars, and a resumed run's
  SessionLog START drops the steps it redoes."""
  accumulator = pytest.importorskip(
      "tensorboard.backend.event_processing.event_accumulator")
  w = tfevents.EventFileWriter(str(tmp_path))
  for step in (1, 2, 3):
    w.write_scalars(step, {"train/loss": 10.0 + step})
  w.close()
  resumed = tfevents.EventFileWriter(str(tmp_path))  # resumed from step 1
  resumed.write_session_start(2)
  resumed.write_scalars(2, {"train/loss": 2.5})
  resumed.close()
  acc = accumulator.EventAccumulator(str(tmp_path))
  acc.Reload()
  assert [(e.step, e.value) for e in acc.Scalars("train/loss")] == [
      (1, 11.0), (2, 2.5)]


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
    bar.update(step, {"loss": 1.0})
  bar.write("eval done")
  lines = out.getvalue().splitlines()
  assert [line.split("]")[1].split("|")[0].strip() for line in lines[:2]] == [
      "5/10", "10/10"]
  assert lines[-1] == "eval done"
