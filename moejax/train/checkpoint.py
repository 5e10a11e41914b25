"""Checkpoints: an orbax CheckpointManager over three items per step.

    <workdir>/checkpoints/<step>/
      state/   the TrainState (params, model state incl. RNG streams,
               optimizer state, step) via orbax StandardSave (sharded arrays,
               written asynchronously)
      data/    the grain iterator position, one JSON file per process
               (grain.checkpoint.CheckpointHandler)
      meta/    JSON: step, tokens_seen, wall time, the config

Orbax writes each step into a temporary directory and renames it into place
when every item is complete, so a step directory that exists is complete; a
crash mid-save leaves only a temporary directory that is never listed as a
step. `max_to_keep` old steps are kept.

Hooks for the reliability work (issue 8) are the two functions the loop
calls: `latest_step()` picks what to resume from and `restore(step, ...)`
loads one step; a fallback to an older step on a corrupt newest one belongs
in `restore_latest`.
"""

import json
import os
import time

import grain
import orbax.checkpoint as ocp

from moejax.train import state as state_lib

STATE, DATA, META = "state", "data", "meta"


class Checkpointer:
  """Periodic async checkpoints of a TrainState and a data iterator.

  Example:
    ckpt = Checkpointer(os.path.join(workdir, 'checkpoints'), max_to_keep=3)
    step = ckpt.latest_step()           # None on a fresh workdir
    if step is not None:
      state, meta = ckpt.restore(step, state, train_iterator)
    ...
    ckpt.save(100, state, train_iterator, {'tokens_seen': n})
    ckpt.close()                        # waits for pending async saves
  """

  def __init__(self, directory, *, max_to_keep=3, async_save=True):
    self.directory = os.path.abspath(directory)
    options = ocp.CheckpointManagerOptions(
        max_to_keep=max_to_keep, create=True,
        enable_async_checkpointing=async_save)
    self.manager = ocp.CheckpointManager(
        self.directory, options=options,
        item_names=(STATE, DATA, META))

  def all_steps(self):
    return sorted(self.manager.all_steps())

  def latest_step(self):
    return self.manager.latest_step()

  def save(self, step, state, data_iterator=None, meta=None):
    """Starts saving `step` (returns once arrays are copied off the devices;
    the files are written in the background). The data iterator's position
    is read now, so call this between steps."""
    meta = dict(meta or {}, step=int(step), time=time.time())
    items = {
        STATE: ocp.args.StandardSave(state_lib.to_checkpoint_tree(state)),
        META: ocp.args.JsonSave(meta),
    }
    if data_iterator is not None:
      items[DATA] = grain.checkpoint.CheckpointSave(data_iterator)
    self.manager.save(int(step), args=ocp.args.Composite(**items), force=True)

  def restore(self, step, template, data_iterator=None):
    """Loads `step` into the shapes and shardings of `template` (a
    TrainState) and moves `data_iterator` to the saved position.

    Returns:
      (TrainState, meta dict).
    """
    items = {
        STATE: ocp.args.StandardRestore(
            state_lib.abstract_checkpoint_tree(template)),
        META: ocp.args.JsonRestore(),
    }
    if data_iterator is not None:
      items[DATA] = grain.checkpoint.CheckpointRestore(data_iterator)
    restored = self.manager.restore(int(step),
                                    args=ocp.args.Composite(**items))
    state = state_lib.from_checkpoint_tree(restored[STATE], template)
    return state, dict(restored[META] or {})

  def restore_latest(self, template, data_iterator=None):
    """(state, meta, step) of the newest checkpoint, or None when there is
    none."""
    step = self.latest_step()
    if step is None:
      return None
    state, meta = self.restore(step, template, data_iterator)
    return state, meta, step

  def wait(self):
    """Blocks until pending async saves are on disk."""
    self.manager.wait_until_finished()

  def close(self):
    self.manager.wait_until_finished()
    self.manager.close()


def write_json_atomic(path, obj):
  """Writes JSON to `path` via a temporary file and a rename."""
  tmp = f"{path}.tmp.{os.getpid()}"
  with open(tmp, "w") as f:
    json.dump(obj, f, indent=2, sort_keys=True)
    f.write("\n")
  os.replace(tmp, path)


def save_config(config, workdir):
  """workdir/config.json: the run's full config (ml_collections ConfigDict or
  dict)."""
  as_dict = config.to_dict() if hasattr(config, "to_dict") else dict(config)
  path = os.path.join(workdir, "config.json")
  write_json_atomic(path, json.loads(json.dumps(as_dict, default=str)))
  return path
