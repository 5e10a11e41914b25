"""Issue 18, items 1-3, on real orbax checkpoints of the smoke LM:

1. a checkpoint is bound to its step: a step directory whose meta or state
   holds another step (a copy of an older step, a state saved under the
   wrong number) is corrupt, moved aside, and resume falls back;
2. the resume-config check reads only verified metadata: a flipped value in
   the config part of the newest step's meta skips that step instead of
   refusing to resume;
3. a step that cannot be read (permissions) is reported as `cannot read
   <path>`, left where it is (it may be intact), never overwritten or
   garbage-collected, and resume falls back to an older step.

Item 3 needs a process that file permissions apply to. As root (the test
machine), the `experiments.train` process runs with CAP_DAC_OVERRIDE and
CAP_DAC_READ_SEARCH dropped from its capability bounding set (setpriv
before exec): it stays uid 0 and owns the files, but mode 000 now
denies it, exactly like any unprivileged user. As a normal user no drop is
needed.
"""

import io
import json
import os
import shutil
import stat
import subprocess
import sys

import grain
import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from moejax import train
from moejax.train import checkpoint as ckpt_lib
from moejax.train import loop
from moejax.train import state as state_lib

import app_runs  # tests/reliability/app_runs.py

REPO = os.path.dirname(os.path.dirname(os.path.dirname(__file__)))
sys.path.insert(0, REPO)
from experiments.configs import lm_stdlib  # noqa: E402  pylint: disable=g-import-not-at-top


# ------------------------------------------------- the smoke LM, in process


def smoke(steps, data_dir):
  """The smoke LM (data-parallel over the devices there are), a checkpoint
  every 10 steps."""
  c = lm_stdlib.get_config("size=smoke")
  c.data.data_dir = str(data_dir)
  c.num_train_steps = steps
  c.checkpoint_every = 10
  c.eval_every = 0
  c.eval_steps = 1
  return c


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  return tmp_path_factory.mktemp("data")


@pytest.fixture(scope="module")
def trained(tmp_path_factory, data_dir):
  """60 steps; checkpoints 40, 50, 60 (max_to_keep 3)."""
  workdir = tmp_path_factory.mktemp("trained") / "w"
  loop.train_and_evaluate(smoke(60, data_dir), str(workdir),
                          stream=io.StringIO())
  assert _steps(workdir) == [40, 50, 60]
  return workdir


def _steps(workdir):
  return sorted(int(n) for n in os.listdir(os.path.join(workdir,
                                                        "checkpoints"))
                if n.isdigit())


def _copy(trained, tmp_path):
  dst = tmp_path / "w"
  shutil.copytree(trained, dst)
  return dst


def _run(config, workdir):
  """(summary, printed text) of an in-process run."""
  out = io.StringIO()
  summary = loop.train_and_evaluate(config, str(workdir), stream=out)
  return summary, out.getvalue()


def _meta(step_dir):
  return json.load(open(os.path.join(step_dir, "meta", "metadata")))


def _state_step(step_dir):
  with ocp.StandardCheckpointer() as ckptr:
    return int(ckptr.restore(os.path.join(step_dir, "state"))["step"])


_tree_bytes = app_runs.tree_bytes


def _flip_num_experts(step_dir):
  """One flipped bit in the config part of the step's meta: the stored
  moe.experts.num_experts 4 ('4', 0x34) becomes 5 ('5', 0x35)."""
  path = os.path.join(step_dir, "meta", "metadata")
  text = open(path).read()
  assert text.count('"num_experts": 4') == 1
  open(path, "w").write(text.replace('"num_experts": 4', '"num_experts": 5'))


# ------------------------------------------ 1. a checkpoint is bound to its step


def test_a_copy_of_an_older_step_is_not_resumed_as_the_newer(
    trained, data_dir, tmp_path):
  # The setup: checkpoints/60 replaced by a copy of checkpoints/50,
  # then a rerun with more steps. It used to print "resumed from .../60
  # (step 60)" and train on from the state of step 50.
  workdir = _copy(trained, tmp_path)
  ckpts = workdir / "checkpoints"
  shutil.rmtree(ckpts / "60")
  shutil.copytree(ckpts / "50", ckpts / "60")

  summary, text = _run(smoke(80, data_dir), workdir)
  assert (f"WARNING: skipped checkpoint step 60: is not the checkpoint of "
          f"step 60: its meta records step 50 and its state is at step 50; "
          f"moved it to {ckpts}/60.corrupt") in text, text
  assert f"resumed from {ckpts}/50 (step 50, " in text
  assert f"resumed from {ckpts}/60" not in text
  # Progress, summary and checkpoints agree again.
  assert summary["step"] == 80
  for step in (70, 80):
    assert _meta(ckpts / str(step))["step"] == step
    assert _state_step(ckpts / str(step)) == step
  assert os.path.isdir(ckpts / "60.corrupt")


def _mesh():
  return jax.make_mesh((2,), ("data",), devices=jax.devices()[:2])


def _small_state(v):
  """A small sharded TrainState whose step and values are v."""
  on = lambda x, spec=P(): jax.device_put(x, NamedSharding(_mesh(), spec))
  return state_lib.TrainState(
      step=on(jnp.asarray(v, jnp.int32)),
      params={"w": on(jnp.arange(64, dtype=jnp.float32).reshape(8, 8)
                      * (v + 1), P("data"))},
      model_state={}, opt_state=(on(jnp.full((4,), v, jnp.float32)),))


def _iterator():
  return iter(grain.MapDataset.range(100).to_iter_dataset())


def _restore_small(directory):
  skipped = []
  ck = ckpt_lib.Checkpointer(str(directory))
  try:
    out = ck.restore_latest(_small_state(0), _iterator(),
                            on_skip=lambda *a: skipped.append(a))
  finally:
    ck.close()
  return out, skipped


def test_a_state_saved_under_another_step_number_is_not_loaded(tmp_path):
  # Meta and fingerprints are consistent (save recorded them), but the
  # state inside is of step 2 while the directory and its meta say 3.
  directory = tmp_path / "checkpoints"
  ck = ckpt_lib.Checkpointer(str(directory))
  it = _iterator()
  ck.save(2, _small_state(2), it)
  ck.wait()
  ck.save(3, _small_state(2), it)
  ck.close()
  (state, meta, step), skipped = _restore_small(directory)
  assert step == 2 and meta["step"] == 2
  assert state_lib.tree_equal(state, _small_state(2))
  assert [(s, r) for s, r, _ in skipped] == [
      (3, "is not the checkpoint of step 3: its state is at step 2")]
  assert skipped[0][2] == str(directory / "3.corrupt")


# ---------------------------------- 2. the config check reads verified meta only


def test_saved_config_comes_from_verified_meta_only(trained, tmp_path):
  workdir = _copy(trained, tmp_path)
  ckpts = workdir / "checkpoints"
  _flip_num_experts(ckpts / "60")
  config, step = ckpt_lib.read_saved_config(str(ckpts))
  assert step == 50
  assert config["moe"]["experts"]["num_experts"] == 4
  # A copy of step 40 at 50: its meta is intact but of another step.
  shutil.rmtree(ckpts / "50")
  shutil.copytree(ckpts / "40", ckpts / "50")
  assert ckpt_lib.read_saved_config(str(ckpts))[1] == 40


def test_a_flipped_config_value_in_the_newest_meta_skips_that_step(
    trained, data_dir, tmp_path):
  # It used to stop with "refusing to resume ... moe.experts.num_experts:
  # 5 (checkpoint) -> 4 (now)" (exit status 2).
  workdir = _copy(trained, tmp_path)
  ckpts = workdir / "checkpoints"
  _flip_num_experts(ckpts / "60")
  summary, text = _run(smoke(70, data_dir), workdir)
  assert (f"WARNING: skipped checkpoint step 60: meta does not match its "
          f"checksum; moved it to {ckpts}/60.corrupt") in text, text
  assert f"resumed from {ckpts}/50 (step 50, " in text
  assert summary["step"] == 70
  assert _steps(workdir) == [50, 60, 70]


def test_a_real_config_change_is_still_refused_against_the_verified_step(
    trained, data_dir, tmp_path):
  workdir = _copy(trained, tmp_path)
  ckpts = workdir / "checkpoints"
  _flip_num_experts(ckpts / "60")
  config = smoke(70, data_dir)
  config.moe.experts.num_experts = 8
  out = io.StringIO()
  with pytest.raises(train.ResumeConfigError) as info:
    loop.train_and_evaluate(config, str(workdir), stream=out)
  assert str(info.value).startswith(
      f"refusing to resume from {ckpts}/50: the config changes 1 field(s)")
  assert info.value.differences == [("moe.experts.num_experts", 4, 8)]
  assert "mesh" not in out.getvalue()  # refused before anything was built
  assert _steps(workdir) == [40, 50, 60]  # nothing renamed


# -------------------------------------------- 3. an unreadable step is left alone


# util-linux setpriv drops the capabilities from the bounding set and execs
# the command (PR_CAPBSET_DROP, as a preexec_fn would, without running Python
# in a forked child of this multithreaded test process).
_DROP_READ_OVERRIDE = ["setpriv",
                       "--bounding-set=-dac_override,-dac_read_search"]


def _drop_prefix():
  """The command prefix that takes root's read override away ([] when not
  root), or None when that cannot be done here."""
  if os.geteuid() != 0:
    return []  # no override to drop
  if shutil.which("setpriv") is None:
    return None
  try:
    proc = subprocess.run(_DROP_READ_OVERRIDE + ["true"], timeout=30,
                          capture_output=True)
  except (OSError, subprocess.SubprocessError):
    return None
  return _DROP_READ_OVERRIDE if proc.returncode == 0 else None


def test_an_unreadable_step_is_reported_and_left_where_it_is(
    trained, data_dir, tmp_path):
  prefix = _drop_prefix()
  if prefix is None:
    pytest.skip("root here cannot drop CAP_DAC_OVERRIDE (no setpriv, or no "
                "CAP_SETPCAP), so file permissions cannot deny it anything")
  workdir = _copy(trained, tmp_path)
  ckpts = workdir / "checkpoints"
  intact = {s: _tree_bytes(ckpts / s) for s in ("50", "60")}
  # Step 60 as a directory nobody may read; in step 50 one file only.
  os.chmod(ckpts / "60", 0)
  os.chmod(ckpts / "50" / "meta" / "metadata", 0)
  cmd = prefix + [sys.executable, "-m", "experiments.train",
         "--config=experiments/configs/lm_stdlib.py:size=smoke",
         f"--config.data.data_dir={data_dir}",
         "--config.num_train_steps=100", "--config.checkpoint_every=10",
         "--config.eval_every=0", "--config.eval_steps=1",
         f"--workdir={workdir}"]
  try:
    proc = subprocess.run(
        cmd, cwd=REPO, env=dict(os.environ, JAX_PLATFORMS="cpu"),
        capture_output=True, text=True, timeout=600)
    listing = sorted(os.listdir(ckpts))
    modes = {s: stat.S_IMODE(os.stat(ckpts / s).st_mode)
             for s in ("50", "60") if (ckpts / s).exists()}
  finally:
    for path in (ckpts / "60", ckpts / "50" / "meta" / "metadata"):
      if path.exists():
        os.chmod(path, 0o755 if path.is_dir() else 0o644)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
  out = proc.stdout
  assert (f"WARNING: skipped checkpoint step 60: cannot read {ckpts}/60: "
          f"PermissionError: [Errno 13] Permission denied: '{ckpts}/60'; "
          f"left it where it is (it may be intact: make it readable to "
          f"resume from it)") in out, out[-3000:]
  assert (f"WARNING: skipped checkpoint step 50: cannot read {ckpts}/50/meta/"
          f"metadata: PermissionError: [Errno 13] Permission denied: "
          f"'{ckpts}/50/meta/metadata'; left it where it is") in out
  assert f"resumed from {ckpts}/40 (step 40, " in out
  assert "missing item" not in out + proc.stderr
  # Neither renamed, nor overwritten when the run reached its step again,
  # nor garbage-collected by max_to_keep=3 when 80, 90, 100 were saved.
  for step in (50, 60):
    assert (f"WARNING: checkpoint step {step} not saved: {ckpts}/{step} "
            f"exists and could not be read; left it as it is") in out
  assert listing == ["100", "50", "60", "80", "90"]
  assert modes["60"] == 0
  for s in ("50", "60"):
    assert _tree_bytes(ckpts / s) == intact[s]
  assert _meta(ckpts / "100")["step"] == 100
