"""A corrupt dataset file: refused at start, or a saved step and one line
mid-run (issue 18, item 8).

Real files throughout: the smoke config's dataset (the 8-file stdlib_bytes
subset) is built once per module by the real builder into a tmp data dir;
each test copies it and damages one array_record file:
- truncated, or with one byte flipped: the real `experiments/train.py`
  refuses to start (exit status 3) with one line naming the file and the
  command that rebuilds it; that command, run as printed, repairs it;
- a dataset built before the manifest existed is verified by reading every
  record (riegeli's chunk hashes) and then gets its manifest;
- a file that goes bad while the run reads it (flipped from the `on_log`
  hook): the loop saves the step it has reached, with the data position of
  an uninterrupted run, and stops naming the file; after the rebuild the
  same command resumes from that step. The same for the evaluation data.

Item 11: resuming a run (orbax checkpoint, grain position, JSON meta) and
reading its dataset unpickle nothing (a CPython audit hook listens).
"""

import collections
import glob
import hashlib
import json
import os
import pickle
import re
import shlex
import shutil
import subprocess
import sys

import pytest

from moejax import data as mdata
from moejax.train import errors
from moejax.train import loop

REPO = os.path.dirname(os.path.dirname(os.path.dirname(__file__)))
if REPO not in sys.path:
  sys.path.insert(0, REPO)

from experiments.configs import lm_stdlib  # pylint: disable=g-import-not-at-top,wrong-import-position

SMOKE = "experiments/configs/lm_stdlib.py:size=smoke"
SMOKE_MAX_FILES = 8  # lm_stdlib.py:size=smoke reads this subset
DATA_ERROR_EXIT_STATUS = 3


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
  """A data dir holding the smoke dataset, built by the real builder."""
  base = tmp_path_factory.mktemp("dataset_integrity")
  data_dir = str(base / "pristine")
  mdata.prepare_stdlib_bytes(data_dir, max_files=SMOKE_MAX_FILES)
  return data_dir


@pytest.fixture(scope="module")
def jax_cache(tmp_path_factory):
  return str(tmp_path_factory.mktemp("jax_cache"))


@pytest.fixture
def data_dir(pristine, tmp_path):
  """A fresh copy of the pristine data dir, for one test to damage."""
  copy = str(tmp_path / "data")
  shutil.copytree(pristine, copy)
  return copy


def _shard(data_dir, split):
  (path,) = glob.glob(os.path.join(
      data_dir, "stdlib_bytes", f"*-max{SMOKE_MAX_FILES}", "*",
      f"stdlib_bytes-{split}.array_record-*"))
  return path


def _flip_byte(path):
  """Flips one bit of one byte inside the records (not the zero padding
  array_record leaves before its footer); returns the offset."""
  with open(path, "rb") as f:
    head = f.read(65536)
  offset = max(i for i, b in enumerate(head) if b) // 2
  with open(path, "r+b") as f:  # in place: an open reader sees it
    f.seek(offset)
    byte = f.read(1)[0]
    f.seek(offset)
    f.write(bytes([byte ^ 0x10]))
  return offset


def _run_app(workdir, data_dir, jax_cache, *flags):
  env = dict(os.environ, JAX_PLATFORMS="cpu", MOEJAX_DATA_DIR=data_dir,
             JAX_COMPILATION_CACHE_DIR=jax_cache,
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")
  return subprocess.run(
      [sys.executable, "-m", "experiments.train", f"--config={SMOKE}",
       f"--workdir={workdir}", *flags],
      cwd=REPO, env=env, capture_output=True, text=True, timeout=300)


def _stopped_line(stderr):
  lines = [l for l in stderr.splitlines() if l.startswith("training stopped: ")]
  assert len(lines) == 1, stderr[-3000:]
  assert "Traceback" not in stderr, stderr[-3000:]
  return lines[0]


def _run_rebuild(line):
  """Runs the rebuild command the message prints (its `python` replaced by
  this interpreter)."""
  m = re.search(r"rebuild it, run: (python -c .*)$", line)
  assert m, line
  argv = shlex.split(m.group(1))
  assert argv[0] == "python"
  proc = subprocess.run([sys.executable] + argv[1:], cwd=REPO,
                        capture_output=True, text=True, timeout=300,
                        env=dict(os.environ, JAX_PLATFORMS="cpu"))
  assert proc.returncode == 0, proc.stderr[-3000:]


@pytest.mark.parametrize("damage", ["truncated", "flipped"])
def test_a_damaged_file_is_refused_before_training(damage, data_dir, jax_cache,
                                                   tmp_path):
  shard = _shard(data_dir, "train")
  if damage == "truncated":
    # What the issue saw: "ArrayRecord file should be at least 64KB big".
    os.truncate(shard, 40000)
  else:
    # Riegeli would find it only when this record is read, ~100 steps in;
    # the 6-step smoke run never reaches it and finished as if all was well.
    _flip_byte(shard)
  workdir = str(tmp_path / "w")
  proc = _run_app(workdir, data_dir, jax_cache)
  assert proc.returncode == DATA_ERROR_EXIT_STATUS, (
      proc.stdout[-2000:] + proc.stderr[-3000:])
  line = _stopped_line(proc.stderr)
  assert f"dataset file {shard} " in line, line
  assert ("40,000 bytes" if damage == "truncated" else "sha256") in line, line
  assert "Nothing was started" in line, line
  # Stopped before anything was built: no checkpoint directory.
  assert not os.path.exists(os.path.join(workdir, "checkpoints"))

  # The printed command rebuilds it (the mid-run test below also trains on
  # a rebuilt dataset).
  _run_rebuild(line)
  assert mdata.check_dataset_files("stdlib_bytes", data_dir=data_dir,
                                   max_files=SMOKE_MAX_FILES) is None


def test_a_manifest_records_every_file_at_build_time(pristine):
  (manifest,) = glob.glob(os.path.join(pristine, "stdlib_bytes", "*", "*",
                                       "moejax_manifest.json"))
  with open(manifest) as f:
    files = json.load(f)["files"]
  version_dir = os.path.dirname(manifest)
  on_disk = sorted(n for n in os.listdir(version_dir)
                   if n != "moejax_manifest.json")
  assert sorted(files) == on_disk
  for name, record in files.items():
    with open(os.path.join(version_dir, name), "rb") as f:
      blob = f.read()
    assert record == {"size": len(blob),
                      "sha256": hashlib.sha256(blob).hexdigest()}, name


def test_a_dataset_without_manifest_is_read_in_full_then_recorded(data_dir):
  shard = _shard(data_dir, "train")
  manifest = os.path.join(os.path.dirname(shard), "moejax_manifest.json")
  os.remove(manifest)  # as built before manifests existed
  mdata.make_lm_dataset(seq_len=32, global_batch_size=8, data_dir=data_dir,
                        max_files=SMOKE_MAX_FILES)
  with open(manifest) as f:
    recorded = json.load(f)["files"][os.path.basename(shard)]
  with open(shard, "rb") as f:
    assert recorded["sha256"] == hashlib.sha256(f.read()).hexdigest()


def test_a_damaged_dataset_without_manifest_is_refused(data_dir):
  shard = _shard(data_dir, "train")
  manifest = os.path.join(os.path.dirname(shard), "moejax_manifest.json")
  os.remove(manifest)
  _flip_byte(shard)
  with pytest.raises(ValueError, match=re.escape(f"dataset file {shard} ")):
    mdata.make_lm_dataset(seq_len=32, global_batch_size=8, data_dir=data_dir,
                          max_files=SMOKE_MAX_FILES)
  assert not os.path.exists(manifest)  # a damaged file is never recorded


def test_a_damaged_dataset_info_is_refused_and_the_rebuild_works(data_dir):
  """TFDS parses dataset_info.json when it opens a build: a damaged one
  failed with a protobuf ParseError, and rebuild=True failed the same way."""
  info = os.path.join(os.path.dirname(_shard(data_dir, "train")),
                      "dataset_info.json")
  with open(info, "r+b") as f:
    f.write(b"{{")
  with pytest.raises(mdata.DatasetFileError) as error:
    mdata.make_lm_dataset(seq_len=32, global_batch_size=8, data_dir=data_dir,
                          max_files=SMOKE_MAX_FILES)
  assert error.value.path == info
  _run_rebuild(str(error.value))
  assert mdata.check_dataset_files("stdlib_bytes", data_dir=data_dir,
                                   max_files=SMOKE_MAX_FILES) is None


def _config(**overrides):
  c = lm_stdlib.get_config("size=smoke")
  for key, value in overrides.items():
    node = c
    *parents, leaf = key.split(".")
    for p in parents:
      node = node[p]
    node[leaf] = value
  return c


def _steps(workdir):
  return sorted(int(n) for n in os.listdir(os.path.join(workdir,
                                                        "checkpoints"))
                if n.isdigit())


def test_a_file_that_goes_bad_mid_run_saves_the_step_and_names_it(
    data_dir, tmp_path, monkeypatch):
  monkeypatch.setenv("MOEJAX_DATA_DIR", data_dir)
  # Large batches, so that the reader comes back to the damaged record
  # within ~20 steps: grain has read 32 documents ahead, and the 7 training
  # documents (45k tokens) are an epoch of ~3 steps here.
  config = _config(num_train_steps=32, batch_size=128,
                   **{"data.seq_len": 128}, checkpoint_every=10,
                   eval_every=0, log_every=1)
  shard = _shard(data_dir, "train")

  def flip_at_step_1(step, metrics):
    del metrics
    if step == 1:
      _flip_byte(shard)

  workdir = str(tmp_path / "w")
  with open(os.devnull, "w") as devnull:
    with pytest.raises(errors.TrainingError) as info:
      loop.train_and_evaluate(config, workdir, stream=devnull,
                              on_log=flip_at_step_1)
  error = info.value
  # (experiments/train.py exits with DATA_ERROR_EXIT_STATUS for it: the
  # subprocess test above. Importing it here would clash with
  # experiments/memory_growth.py's absl flags in one pytest process.)
  assert isinstance(error, errors.DatasetError), repr(error)
  text = str(error)
  assert "\n" not in text, text
  step = error.step
  assert 1 <= step < 32, text
  assert f"reading the training data failed after step {step}" in text, text
  assert "chunk data hash mismatch" in text, text  # riegeli's own words
  assert f"dataset file {shard} " in text, text
  assert f"saved checkpoint {workdir}/checkpoints/{step}" in text, text
  # The step reached was saved, beyond the last periodic checkpoint, and
  # its metrics were written.
  assert _steps(workdir)[-1] == step
  records = [json.loads(l) for l in open(os.path.join(workdir,
                                                      "metrics.jsonl"))]
  assert max(r["step"] for r in records) == step

  _run_rebuild(text)
  # The saved data position is that of an uninterrupted run after `step`
  # batches (the read that failed consumed nothing).
  train_ds, _ = loop.make_datasets(config)
  it = iter(train_ds)
  for _ in range(step):
    next(it)
  with open(os.path.join(workdir, "checkpoints", str(step), "data",
                         "process_0-of-1.json")) as f:
    assert json.load(f) == it.get_state()
  # The same command resumes from that step (2 more steps, to be quick).
  config.num_train_steps = step + 2
  log = tmp_path / "resume.txt"
  with open(log, "w") as stream:
    summary = loop.train_and_evaluate(config, workdir, stream=stream)
  assert summary["step"] == step + 2
  assert f"resumed from {workdir}/checkpoints/{step} (step {step}" in (
      log.read_text())


def test_an_eval_file_that_goes_bad_saves_the_step_and_names_it(
    data_dir, tmp_path, monkeypatch):
  monkeypatch.setenv("MOEJAX_DATA_DIR", data_dir)
  # No periodic checkpoint: the one at step 3 is the failure's.
  config = _config(checkpoint_every=0, eval_every=3)
  shard = _shard(data_dir, "validation")

  def flip_at_step_1(step, metrics):
    del metrics
    if step == 1:
      _flip_byte(shard)  # read first by the eval at step 3

  workdir = str(tmp_path / "w")
  with open(os.devnull, "w") as devnull:
    with pytest.raises(errors.TrainingError) as info:
      loop.train_and_evaluate(config, workdir, stream=devnull,
                              on_log=flip_at_step_1)
  text = str(info.value)
  assert isinstance(info.value, errors.DatasetError), text
  assert info.value.step == 3, text
  assert "reading the evaluation data failed at step 3" in text, text
  assert f"dataset file {shard} " in text, text
  assert _steps(workdir) == [3]


def test_unchanged_files_after_a_read_error_say_so(data_dir):
  """The check a read error triggers names no file when every file still
  matches: the message must not send the user off to rebuild."""
  problem = mdata.check_dataset_files("stdlib_bytes", data_dir=data_dir,
                                      max_files=SMOKE_MAX_FILES)
  assert problem is None
  shard = _shard(data_dir, "validation")
  _flip_byte(shard)
  problem = mdata.check_dataset_files("stdlib_bytes", data_dir=data_dir,
                                      max_files=SMOKE_MAX_FILES)
  assert isinstance(problem, mdata.DatasetFileError)
  assert problem.path == shard
  assert "rebuild=True" in problem.rebuild


# ------------------------------------------------- item 11: no pickle loads

_PICKLE_EVENTS = []  # 'pickle.find_class' audit events while listening
_LISTENING = []
_HOOKED = []


def _audit(event, args):
  if _LISTENING and event == "pickle.find_class":
    _PICKLE_EVENTS.append(args)


def test_resuming_loads_no_pickle(data_dir, tmp_path, monkeypatch):
  """docs/reliability.md says checkpoints and datasets load no pickle. An
  unpickler resolves every class or function it builds through
  find_class, which raises the 'pickle.find_class' audit event, in C and
  in Python: none may happen while a run resumes (orbax state, grain data
  position, JSON meta) and reads its dataset (TFDS JSON, array_record)."""
  if not _HOOKED:
    sys.addaudithook(_audit)  # hooks cannot be removed; _LISTENING gates it
    _HOOKED.append(True)
  monkeypatch.setenv("MOEJAX_DATA_DIR", data_dir)
  config = _config(num_train_steps=3, checkpoint_every=3, eval_every=3)
  workdir = str(tmp_path / "w")
  with open(os.devnull, "w") as devnull:
    loop.train_and_evaluate(config, workdir, stream=devnull)
    config.num_train_steps = 4
    _LISTENING.append(True)
    try:
      pickle.loads(pickle.dumps(collections.OrderedDict()))  # it listens
      assert _PICKLE_EVENTS, "no audit event from a real unpickling"
      del _PICKLE_EVENTS[:]
      log = tmp_path / "resume.txt"
      with open(log, "w") as stream:
        summary = loop.train_and_evaluate(config, workdir, stream=stream)
    finally:
      _LISTENING.clear()
  assert "resumed from" in log.read_text() and summary["step"] == 4
  assert _PICKLE_EVENTS == [], _PICKLE_EVENTS[:10]
