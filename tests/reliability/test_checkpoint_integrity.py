"""Checkpointer on real orbax checkpoints of a small TrainState, in process:
every kind of damage to the newest step makes restore_latest fall back to
the previous good one with a reason, and garbage is never loaded."""

import json
import os
import shutil

import grain
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from moejax import train
from moejax.train import checkpoint as ckpt_lib
from moejax.train import state as state_lib

STEPS = (1, 2, 3)


def _mesh():
  return jax.make_mesh((2,), ("data",), devices=jax.devices()[:2])


def make_state(v):
  """A TrainState laid out on a 2-device mesh, every value a function of v
  (float32 sharded, bfloat16, int32, a typed rbg key, a tuple)."""
  mesh = _mesh()
  on = lambda x, spec=P(): jax.device_put(x, NamedSharding(mesh, spec))
  return state_lib.TrainState(
      step=on(jnp.asarray(v, jnp.int32)),
      params={"w": on(jnp.arange(4096, dtype=jnp.float32).reshape(64, 64)
                      * (v + 1), P("data")),
              "b": on(jnp.arange(8, dtype=jnp.bfloat16) + v)},
      model_state={"key": on(jax.random.key(v, impl="rbg"))},
      opt_state=(on(jnp.full((16,), v, jnp.float32)),))


def _iterator():
  return iter(grain.MapDataset.range(1000).shuffle(seed=3).to_iter_dataset())


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
  """A directory with steps 1, 2, 3 and the data position after each."""
  directory = tmp_path_factory.mktemp("ckpt") / "checkpoints"
  it = _iterator()
  positions = {}
  ck = ckpt_lib.Checkpointer(str(directory), max_to_keep=3)
  for step in STEPS:
    for _ in range(5):
      next(it)
    ck.save(step, make_state(step), it, {"tokens_seen": 10 * step})
    ck.wait()
    positions[step] = next(_copy(it))
  ck.close()
  return directory, positions


def _copy(it):
  other = _iterator()
  other.set_state(it.get_state())
  return other


@pytest.fixture
def workdir(pristine, tmp_path):
  directory = tmp_path / "checkpoints"
  shutil.copytree(pristine[0], directory)
  return directory


def _restore(directory):
  """(state, meta, step, skipped, next data element) of restore_latest."""
  skipped = []
  it = _iterator()
  ck = ckpt_lib.Checkpointer(str(directory))
  try:
    out = ck.restore_latest(make_state(0), it,
                            on_skip=lambda *a: skipped.append(a))
  finally:
    ck.close()
  if out is None:
    return None
  state, meta, step = out
  return state, meta, step, skipped, next(it)


def _largest_array_file(step_dir):
  files = [os.path.join(r, f) for r, _, fs in os.walk(step_dir / "state")
           for f in fs if os.sep + "d" + os.sep in os.path.join(r, f)]
  # The top-level OCDBT data files (the per-process ones are merged).
  files = [f for f in files if "ocdbt.process_" not in f]
  return max(files, key=os.path.getsize)


def _assert_fell_back(directory, pristine, to_step, reason):
  state, meta, step, skipped, element = _restore(directory)
  assert step == to_step
  assert state_lib.tree_equal(state, make_state(to_step))
  assert meta["tokens_seen"] == 10 * to_step
  assert element == pristine[1][to_step]  # the data position, too
  assert [s for s, _, _ in skipped] == list(range(3, to_step, -1))
  assert reason in skipped[0][1], skipped
  # The bad steps are moved aside, so they are no longer listed.
  for bad, _, moved_to in skipped:
    assert moved_to == str(directory / f"{bad}.corrupt")
    assert os.path.isdir(moved_to) and not (directory / str(bad)).exists()
  return skipped


def test_intact_checkpoints_restore_the_newest(workdir, pristine):
  state, meta, step, skipped, element = _restore(workdir)
  assert (step, skipped) == (3, [])
  assert state_lib.tree_equal(state, make_state(3))
  assert element == pristine[1][3]
  assert len(meta["fingerprint"]) == 5 and "meta_sha256" in meta


def test_truncated_array_file(workdir, pristine):
  path = _largest_array_file(workdir / "3")
  with open(path, "r+b") as f:
    f.truncate(os.path.getsize(path) // 2)
  _assert_fell_back(workdir, pristine, 2, "does not load")


def test_flipped_bit_in_array_data_is_caught_by_the_fingerprint(
    workdir, pristine):
  # Orbax itself loads this silently with one wrong value; the fingerprint
  # recorded at save time catches it.
  path = _largest_array_file(workdir / "3")
  data = bytearray(open(path, "rb").read())
  caught = False
  for offset in range(len(data) // 4, len(data), max(1, len(data) // 16)):
    trial = bytearray(data)
    trial[offset] ^= 0x10
    open(path, "wb").write(trial)
    result = _restore(workdir)
    state, _, step, skipped, _ = result
    if step == 3:  # the flip hit bytes that do not matter
      assert state_lib.tree_equal(state, make_state(3))
      continue
    assert step == 2 and skipped[0][0] == 3
    caught = True
    break
  assert caught


def test_missing_meta(workdir, pristine):
  shutil.rmtree(workdir / "3" / "meta")
  _assert_fell_back(workdir, pristine, 2, "missing item(s) ['meta']")


def test_edited_meta_fails_its_checksum(workdir, pristine):
  path = workdir / "3" / "meta" / "metadata"
  meta = json.loads(path.read_text())
  meta["tokens_seen"] = 31
  path.write_text(json.dumps(meta))
  _assert_fell_back(workdir, pristine, 2, "meta does not match its checksum")


def test_garbage_meta(workdir, pristine):
  (workdir / "3" / "meta" / "metadata").write_text('{"tokens_se')
  _assert_fell_back(workdir, pristine, 2, "does not load")


def test_missing_state_metadata(workdir, pristine):
  os.remove(workdir / "3" / "state" / "_METADATA")
  _assert_fell_back(workdir, pristine, 2, "does not load")


def test_edited_data_position(workdir, pristine):
  path = workdir / "3" / "data" / "process_0-of-1.json"
  text = path.read_text()
  state = json.loads(text)
  path.write_text(text.replace(str(_some_int(state)),
                               str(_some_int(state) + 1), 1))
  _assert_fell_back(workdir, pristine, 2, "data iterator position")


def _some_int(tree):
  if isinstance(tree, dict):
    for v in tree.values():
      found = _some_int(v)
      if found is not None:
        return found
  if isinstance(tree, int) and not isinstance(tree, bool) and tree > 0:
    return tree
  return None


def test_two_bad_steps_fall_back_two(workdir, pristine):
  shutil.rmtree(workdir / "3" / "data")
  os.remove(_largest_array_file(workdir / "2"))
  skipped = _assert_fell_back(workdir, pristine, 1, "missing item(s)")
  assert "does not load" in skipped[1][1]


def test_all_bad_raises_and_moves_nothing(workdir):
  for step in STEPS:
    shutil.rmtree(workdir / str(step) / "meta")
  with pytest.raises(train.CheckpointRestoreError) as info:
    _restore(workdir)
  text = str(info.value)
  assert text.startswith(f"no checkpoint in {workdir} can be loaded:")
  for step in STEPS:
    assert f"step {step}: missing item(s) ['meta']" in text
  assert sorted(os.listdir(workdir)) == ["1", "2", "3"]


def test_unfinished_temporary_directory_is_ignored_and_removed(
    workdir, pristine):
  # What a kill during a save leaves behind.
  tmp = workdir / "4.orbax-checkpoint-tmp"
  shutil.copytree(workdir / "3", tmp)
  state, _, step, skipped, _ = _restore(workdir)
  assert (step, skipped) == (3, [])
  assert not tmp.exists()


def test_a_moved_aside_step_can_be_saved_again(workdir):
  shutil.rmtree(workdir / "3" / "meta")
  _restore(workdir)
  ck = ckpt_lib.Checkpointer(str(workdir))
  ck.save(3, make_state(3), _iterator())
  ck.close()
  assert sorted(os.listdir(workdir)) == ["1", "2", "3", "3.corrupt"]
  assert _restore(workdir)[2] == 3


def test_fingerprint_sees_every_element_and_position():
  x = jnp.arange(64, dtype=jnp.float32).reshape(8, 8)
  base = ckpt_lib.fingerprint([x])
  assert ckpt_lib.fingerprint([x]) == base
  for i in range(8):
    for j in range(8):
      bumped = x.at[i, j].set(jnp.nextafter(x[i, j], jnp.inf))
      assert ckpt_lib.fingerprint([bumped]) != base, (i, j)
  assert ckpt_lib.fingerprint([x.T]) != base
  # Independent of the layout: sharded or not, the same number.
  sharded = jax.device_put(x, NamedSharding(_mesh(), P("data")))
  assert ckpt_lib.fingerprint([sharded]) == base
  for dtype in (jnp.bfloat16, jnp.int8, jnp.bool_, jnp.uint32):
    y = x.astype(dtype)
    assert len(ckpt_lib.fingerprint([y])) == 1


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores permissions; "
                    "test_fault_injection.py covers this with a read-only "
                    "mount")
def test_unwritable_directory_is_a_clear_save_error(tmp_path):
  directory = tmp_path / "checkpoints"
  ck = ckpt_lib.Checkpointer(str(directory))
  ck.save(1, make_state(1))
  ck.wait()
  os.chmod(directory, 0o555)
  try:
    with pytest.raises(train.CheckpointSaveError) as info:
      ck.save(2, make_state(2))
    ck.close(quiet=True)
  finally:
    os.chmod(directory, 0o755)
  text = str(info.value)
  assert text.startswith(f"could not save checkpoint step 2 in {directory}:")
  assert "the newest complete checkpoint is step 1" in text
  assert "Nothing partial is listed as a checkpoint" in text
  assert isinstance(info.value, OSError)


def test_old_steps_are_deleted_only_after_a_newer_save_completes(tmp_path):
  # max_to_keep=2 over steps 1..3: step 1 outlives the save of step 3 in
  # flight (a save that then fails must not cost it: orbax alone deletes
  # it even then), and goes once step 3 is complete.
  directory = tmp_path / "checkpoints"
  listed = lambda: sorted(os.listdir(directory))
  ck = ckpt_lib.Checkpointer(str(directory), max_to_keep=2)
  for step in (1, 2):
    ck.save(step, make_state(step))
    ck.wait()
  ck.save(3, make_state(3))
  assert "1" in listed()
  ck.wait()
  assert listed() == ["2", "3"]
  # A delete that a crash interrupted leaves a temporary name: never a
  # step, and removed by the next Checkpointer (orbax's cleanup of
  # temporary directories, finished by its first save).
  os.rename(directory / "2", directory / f"2{ckpt_lib._DELETED}1")
  ck.close()
  ck = ckpt_lib.Checkpointer(str(directory), max_to_keep=2)
  assert ck.all_steps() == [3]
  ck.save(4, make_state(4))
  ck.close()
  assert listed() == ["3", "4"]
