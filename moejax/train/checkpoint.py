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
step (and is deleted when the next Checkpointer opens the directory).
The newest `max_to_keep` steps are kept; older ones are deleted only once a
newer save is known to be complete, so a failed save never costs one.

Every save also records in `meta` a fingerprint of each array of the state
(a position-weighted uint32 sum of its bits, computed on the devices), a
SHA-256 of the data iterator's state and a SHA-256 of `meta` itself.
`restore` recomputes them and raises `CorruptCheckpointError` on any
difference, so a truncated, bit-flipped or half-deleted checkpoint is never
loaded silently. A checkpoint is also bound to its step: the directory's
step, the step `meta` records and the restored state's step must agree, so a
copy of another step is corrupt too. `restore_latest` tries the steps newest
first, moves each unusable one aside to `<step>.corrupt` (with a warning
naming the step and the reason) and returns the newest good one; a step it
cannot read (file permissions) may be intact, so it is reported as `cannot
read <path>` and left where it is, never saved over or deleted. A failed
save raises
`CheckpointSaveError` naming the step, the reason and the newest complete
checkpoint.
"""

import errno
import hashlib
import json
import os
import re
import shutil
import time

from absl import logging
import grain
import jax
from jax import lax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from moejax.train import state as state_lib
from moejax.train.errors import CheckpointRestoreError
from moejax.train.errors import CheckpointSaveError

STATE, DATA, META = "state", "data", "meta"
CORRUPT_SUFFIX = ".corrupt"
# An old step being deleted: never listed as a step (see Checkpointer._delete).
_DELETED = ".orbax-checkpoint-tmp-deleted-"


class CorruptCheckpointError(ValueError):
  """One checkpoint step failed to load or to verify."""


class UnreadableCheckpointError(CorruptCheckpointError):
  """One checkpoint step cannot be read (file permissions): it may be
  intact, so it is skipped but never moved, overwritten or deleted."""


# ------------------------------------------------------------- verification


def _as_uint32(x):
  """The bits of `x` as uint32 values of the same shape."""
  if x.dtype == jnp.bool_:
    return x.astype(jnp.uint32)
  size = jnp.dtype(x.dtype).itemsize
  if size == 4:
    return lax.bitcast_convert_type(x, jnp.uint32)
  if size in (1, 2):
    small = jnp.uint8 if size == 1 else jnp.uint16
    return lax.bitcast_convert_type(x, small).astype(jnp.uint32)
  if size == 8:
    halves = lax.bitcast_convert_type(x, jnp.uint32)  # [..., 2]
    return halves[..., 0] ^ (halves[..., 1] * jnp.uint32(0x9E3779B9))
  raise TypeError(f"cannot fingerprint dtype {x.dtype}")


def _leaf_fingerprint(x):
  """<uint32>[]: sum over elements of mix(bits ^ f(linear index)).

  mix (multiply by an odd constant, then xorshift) is a bijection, so any
  change to one element changes the sum; the index term catches moved
  values. Integer sums wrap exactly, so the result does not depend on how
  the array is sharded or in what order the devices reduce it.
  """
  u = _as_uint32(x)
  index = jnp.zeros(u.shape, jnp.uint32)
  stride = 1
  for dim in reversed(range(u.ndim)):
    iota = lax.broadcasted_iota(jnp.uint32, u.shape, dim)
    index = index + iota * jnp.uint32(stride % 2**32)
    stride *= u.shape[dim]
  h = (u ^ (index * jnp.uint32(0x9E3779B9))) * jnp.uint32(0x85EBCA6B)
  h = h ^ (h >> 13)
  return jnp.sum(h, dtype=jnp.uint32)


@jax.jit
def _fingerprints(tree):
  return jnp.stack([_leaf_fingerprint(x) for x in jax.tree.leaves(tree)])


def fingerprint(tree):
  """[int]: one uint32 fingerprint per array of `tree` (in jax.tree.leaves
  order), computed where the arrays live (one jitted call per set of
  devices; a TrainState has one)."""
  leaves = jax.tree.leaves(tree)
  groups = {}
  for i, x in enumerate(leaves):
    sharding = getattr(x, "sharding", None)
    devices = (frozenset(d.id for d in sharding.device_set)
               if sharding is not None else None)
    groups.setdefault(devices, []).append(i)
  out = [0] * len(leaves)
  for indices in groups.values():
    values = np.asarray(jax.device_get(
        _fingerprints([leaves[i] for i in indices])))
    for i, v in zip(indices, values):
      out[i] = int(v)
  return out


def _sha256(obj):
  text = json.dumps(obj, sort_keys=True, default=str)
  return hashlib.sha256(text.encode()).hexdigest()


def _jsonable(obj):
  """obj as JSON reads it back (tuples as lists, unknown types as str)."""
  return json.loads(json.dumps(obj, default=str))


_OS_ERROR_CODE = re.compile(r"os_error_code='(\d+)'")


def describe_error(error):
  """A one-line reason: the first OSError in the cause chain if there is
  one ('OSError: [Errno 28] No space left on device'), the same for an OS
  error that TensorStore reports inside its own message
  ([os_error_code='28']), else the error's first line."""
  chain, e = [], error
  while e is not None and all(e is not c for c in chain):
    chain.append(e)
    e = e.__cause__ or e.__context__
  for e in chain:
    if isinstance(e, OSError) and e.errno is not None:
      return f"{type(e).__name__}: {e}"
  for e in chain:
    match = _OS_ERROR_CODE.search(str(e))
    if match:
      code = int(match.group(1))
      return f"OSError: [Errno {code}] {os.strerror(code)}"
  text = str(error).strip().splitlines()
  first = text[0] if text else ""
  if len(first) > 300:
    first = first[:300] + "..."
  return f"{type(error).__name__}: {first}"


class Checkpointer:
  """Periodic async checkpoints of a TrainState and a data iterator.

  Example:
    ckpt = Checkpointer(os.path.join(workdir, 'checkpoints'), max_to_keep=3)
    restored = ckpt.restore_latest(state, train_iterator)  # None: fresh
    if restored is not None:
      state, meta, step = restored
    ...
    ckpt.save(100, state, train_iterator, {'tokens_seen': n})
    ckpt.close()                        # waits for pending async saves
  """

  def __init__(self, directory, *, max_to_keep=3, async_save=True,
               read_only=False):
    """read_only: for reading another run's checkpoints (load_model): no
    directory is created, and no temporary directory of a save in progress
    is cleaned up."""
    self.directory = os.path.abspath(directory)
    # Steps restore_latest found unreadable: left in place, never saved over.
    self._kept = set()
    self._policy = _KeepLatestAndUnreadable(
        max_to_keep, self._kept, self.step_path)
    options = ocp.CheckpointManagerOptions(
        # Orbax keeps every step: it decides what to delete when a save
        # starts and deletes it even when that save then fails (its
        # finalize only logs the error), so a full disk would also cost an
        # old checkpoint. Old steps are deleted by _collect instead, once a
        # save is known to be complete.
        preservation_policy=ocp.checkpoint_managers.LatestN(n=None),
        create=not read_only,
        read_only=read_only,
        enable_async_checkpointing=async_save,
        cleanup_tmp_directories=not read_only,
        # Create the step's temporary directory in save() itself, so an
        # unwritable directory fails there at once (created in the
        # background, the failure surfaces only as a 300 s barrier timeout).
        async_options=ocp.AsyncOptions(
            create_directories_asynchronously=False))
    try:
      self.manager = ocp.CheckpointManager(
          self.directory, options=options,
          item_names=(STATE, DATA, META))
    except OSError as e:
      raise CheckpointSaveError(
          f"cannot open the checkpoint directory {self.directory}: "
          f"{describe_error(e)}") from e
    self._in_flight = None  # the step of an async save not yet waited for

  def all_steps(self):
    return sorted(self.manager.all_steps())

  def latest_step(self):
    return self.manager.latest_step()

  def step_path(self, step):
    return os.path.join(self.directory, str(int(step)))

  # ----------------------------------------------------------- saving

  def save(self, step, state, data_iterator=None, meta=None):
    """Starts saving `step` (returns once arrays are copied off the devices;
    the files are written in the background). The data iterator's position
    is read now, so call this between steps.

    Returns:
      True; False when `step` was not saved because its directory exists
      and could not be read at restore (restore_latest left it in place; it
      may be intact, so it is not overwritten).
    Raises:
      CheckpointSaveError: this save, or the previous async one, failed.
    """
    if int(step) in self._kept:
      self.check()
      return False
    self.wait()  # surfaces a failure of the previous save under its step
    tree = state_lib.to_checkpoint_tree(state)
    meta = dict(meta or {}, step=int(step), time=time.time(),
                fingerprint=fingerprint(tree))
    if data_iterator is not None and jax.process_count() == 1:
      meta["data_sha256"] = _sha256(_data_state(data_iterator))
    meta = _jsonable(meta)
    meta["meta_sha256"] = _sha256(meta)
    items = {
        STATE: ocp.args.StandardSave(tree),
        META: ocp.args.JsonSave(meta),
    }
    if data_iterator is not None:
      items[DATA] = grain.checkpoint.CheckpointSave(data_iterator)
    try:
      self.manager.save(int(step), args=ocp.args.Composite(**items),
                        force=True)
    except Exception as e:  # pylint: disable=broad-except
      raise self._save_error(step, e) from e
    self._in_flight = int(step)
    return True

  def wait(self):
    """Blocks until pending async saves are on disk.

    Raises:
      CheckpointSaveError: the pending save failed.
    """
    step, self._in_flight = self._in_flight, None
    try:
      self.manager.wait_until_finished()
      self.manager.check_for_errors()
    except Exception as e:  # pylint: disable=broad-except
      raise self._save_error(step, e) from e
    if step is not None:
      self._collect(step)

  def _collect(self, saved):
    """Deletes the steps max_to_keep no longer keeps, once step `saved` is
    complete on disk; never a step in _kept or one that cannot be read (see
    _KeepLatestAndUnreadable).

    Only process 0 deletes or even lists the directory here, without a
    barrier: check() may get here on one process and not yet on another,
    and another process listing the directory while process 0 deletes
    would find a step gone between its listing and its stat. The others'
    in-memory listings keep the old steps; nothing reads them there (a
    restart lists the directory again). Each old step is first renamed to
    a temporary name, so a crash mid-delete leaves a directory that is
    never listed as a step, and the next Checkpointer to open removes it.
    """
    if jax.process_index() != 0:
      return
    self._reload()
    steps = self.all_steps()
    if saved not in steps:  # the save did not land: delete nothing
      return
    infos = [_StepInfo(s) for s in steps]
    keep = self._policy.should_preserve(infos, context=None)
    for info, kept in zip(infos, keep):
      if not kept:
        self._delete(info.step)
    self._reload()

  def _reload(self, attempts=5):
    """manager.reload(), again when a step vanished between orbax's listing
    and its stat of the step (process 0 deleting an old one meanwhile)."""
    for attempt in range(attempts):
      try:
        self.manager.reload()
        return
      except FileNotFoundError:
        if attempt == attempts - 1:
          raise
        time.sleep(0.05)

  def _delete(self, step):
    path = self.step_path(step)
    doomed = f"{path}{_DELETED}{time.time_ns()}"
    try:
      os.rename(path, doomed)
      shutil.rmtree(doomed)
    except OSError as e:
      # An old step that cannot be deleted is only kept longer.
      logging.warning("could not delete old checkpoint step %d: %s", step,
                      describe_error(e))

  def check(self):
    """Raises CheckpointSaveError if the async save in flight has already
    failed; returns at once otherwise (call it between steps)."""
    if self._in_flight is None:
      return
    if not self.manager.is_saving_in_progress():
      self.wait()
      return
    try:
      self.manager.check_for_errors()
    except Exception as e:  # pylint: disable=broad-except
      step, self._in_flight = self._in_flight, None
      raise self._save_error(step, e) from e

  def newest(self):
    """'the newest complete checkpoint is step N (path)', read from disk."""
    try:
      self._reload()
      # (not a step that restore_latest could not read)
      steps = [s for s in self.all_steps() if s not in self._kept]
    except Exception:  # pylint: disable=broad-except
      steps = []
    if not steps:
      return "there is no complete checkpoint yet"
    return (f"the newest complete checkpoint is step {steps[-1]} "
            f"({self.step_path(steps[-1])})")

  def close(self, quiet=False):
    """Waits for pending saves and releases the manager. quiet: log a
    failed save instead of raising (when another error is on its way)."""
    try:
      self.wait()
    except CheckpointSaveError as e:
      if not quiet:
        self._close_manager()
        raise
      logging.warning("%s", e)
    self._close_manager()

  def _close_manager(self):
    try:
      self.manager.close()
    except Exception as e:  # pylint: disable=broad-except
      logging.warning("closing the checkpoint manager: %s", describe_error(e))

  def _save_error(self, step, error):
    newest = self.newest()
    which = f"step {step}" if step is not None else "a step"
    return CheckpointSaveError(
        f"could not save checkpoint {which} in {self.directory}: "
        f"{describe_error(error).rstrip('.')}. Nothing partial is listed as a checkpoint; "
        f"{newest}, and the checkpoints there are intact. Make the "
        f"directory writable or free space, then run the same command to "
        f"resume.")

  # ----------------------------------------------------------- loading

  def restore(self, step, template, data_iterator=None):
    """Loads `step` into the shapes and shardings of `template` (a
    TrainState), verifies it and moves `data_iterator` to the saved
    position.

    Returns:
      (TrainState, meta dict).
    Raises:
      UnreadableCheckpointError (a CorruptCheckpointError): a directory or
        file of the step cannot be read (permissions).
      CorruptCheckpointError: an item is missing, does not load, does not
        match the fingerprints recorded when it was saved, or holds another
        step (the directory's step, meta's step and the state's step must
        agree).
    """
    tree, meta = self.restore_tree(
        step, state_lib.abstract_checkpoint_tree(template), data_iterator)
    state = state_lib.from_checkpoint_tree(tree, template)
    return state, meta

  def restore_tree(self, step, abstract_tree, data_iterator=None):
    """restore() of a checkpoint tree (to_checkpoint_tree's dict of plain
    arrays): `abstract_tree` holds jax.ShapeDtypeStructs with the
    shardings to load into, whatever mesh the step was saved on
    (moejax.train.load_model). Verified as restore() does.

    Returns:
      (tree of jax.Arrays, meta dict).
    """
    path = self.step_path(step)
    denied = _first_unreadable(path)
    if denied is not None:
      raise _unreadable_error(*denied)
    wanted = (STATE, META) + ((DATA,) if data_iterator is not None else ())
    missing = [i for i in wanted if not os.path.isdir(os.path.join(path, i))]
    if missing:
      raise CorruptCheckpointError(f"missing item(s) {missing} in {path}")
    items = {
        STATE: ocp.args.StandardRestore(abstract_tree),
        META: ocp.args.JsonRestore(),
    }
    if data_iterator is not None:
      items[DATA] = grain.checkpoint.CheckpointRestore(data_iterator)
    try:
      restored = self.manager.restore(int(step),
                                      args=ocp.args.Composite(**items))
    except Exception as e:  # pylint: disable=broad-except
      if _permission_denied(e):
        raise _unreadable_error(path, e) from e
      raise CorruptCheckpointError(f"does not load: {describe_error(e)}") from e
    meta = dict(restored[META] or {})
    _verify(meta, restored[STATE])
    _verify_step(step, meta, restored[STATE])
    if data_iterator is not None and "data_sha256" in meta:
      _verify_data_file(os.path.join(path, DATA), meta["data_sha256"])
    return restored[STATE], meta

  def restore_latest(self, template, data_iterator=None, *, on_skip=None):
    """(state, meta, step) of the newest checkpoint that loads and
    verifies, or None when there is none.

    A newer step that fails is moved aside to `<step>.corrupt` (so it is no
    longer listed and the step can be saved again) and reported through
    `on_skip(step, reason, moved_to)` (default: a logged warning). A newer
    step that cannot be read (permissions) may be intact: it is reported
    with moved_to None and left where it is; this Checkpointer then neither
    saves over it (save returns False) nor deletes it (max_to_keep).

    Raises:
      CheckpointRestoreError: checkpoints exist but none loads; nothing is
        moved then, so no work is lost by starting again.
    """
    on_skip = on_skip or _log_skip
    skipped = []  # (step, reason, whether it may be intact)
    for step in reversed(self.all_steps()):
      try:
        state, meta = self.restore(step, template, data_iterator)
      except CorruptCheckpointError as e:
        unreadable = isinstance(e, UnreadableCheckpointError)
        if unreadable:
          self._kept.add(step)
        skipped.append((step, str(e), unreadable))
        continue
      for bad, reason, unreadable in skipped:
        on_skip(bad, reason, None if unreadable else self._quarantine(bad))
      if any(not unreadable for _, _, unreadable in skipped):
        self.manager.reload()
      return state, meta, step
    if skipped:
      lines = "\n".join(f"  step {s}: {r}" for s, r, _ in skipped)
      raise CheckpointRestoreError(
          f"no checkpoint in {self.directory} can be loaded:\n{lines}\n"
          f"Nothing was changed on disk. Move the directory away to start "
          f"from scratch.")
    return None

  def _quarantine(self, step):
    """Renames the step's directory to `<step>.corrupt[.n]`; returns the new
    path (None on a non-primary process, which leaves it to process 0)."""
    if jax.process_index() != 0:
      return None
    src = self.step_path(step)
    dst, n = src + CORRUPT_SUFFIX, 1
    while os.path.exists(dst):
      dst, n = f"{src}{CORRUPT_SUFFIX}.{n}", n + 1
    os.replace(src, dst)
    return dst


def _log_skip(step, reason, moved_to):
  if moved_to is None:
    logging.warning("skipped checkpoint step %s (%s)", step, reason)
  else:
    logging.warning("skipped checkpoint step %s (%s); moved to %s", step,
                    reason, moved_to)


class _StepInfo:
  """What _KeepLatestAndUnreadable reads of an orbax CheckpointInfo."""

  def __init__(self, step):
    self.step = step


class _KeepLatestAndUnreadable:
  """Which steps to keep (orbax's PreservationPolicy API): the newest `n`
  steps (all when n is None), and any step in `kept` or that cannot be read
  (it may be intact, and deleting it would fail anyway)."""

  def __init__(self, n, kept, step_path):
    self.n, self.kept, self.step_path = n, kept, step_path

  def should_preserve(self, checkpoints, *, context):
    del context
    first_kept = 0 if self.n is None else len(checkpoints) - self.n
    latest = [i >= first_kept for i in range(len(checkpoints))]
    return [keep or c.step in self.kept
            or _first_unreadable(self.step_path(c.step)) is not None
            for keep, c in zip(latest, checkpoints)]


def _first_unreadable(path):
  """(path, PermissionError) of the first directory or file under `path`
  that this process may not list or open, or None. Other errors (a missing
  path, ...) are left to the checks that follow."""
  stack = [path]
  while stack:
    directory = stack.pop()
    try:
      entries = sorted(os.scandir(directory), key=lambda e: e.name,
                       reverse=True)
    except PermissionError as e:
      return directory, e
    except OSError:
      continue
    for entry in entries:
      try:
        if entry.is_dir(follow_symlinks=False):
          stack.append(entry.path)
          continue
        os.close(os.open(entry.path, os.O_RDONLY))
      except PermissionError as e:
        return entry.path, e
      except OSError:
        continue
  return None


def _permission_denied(error):
  """Whether a load error was caused by file permissions (EACCES, EPERM),
  raised by Python or reported by TensorStore in its message."""
  chain, e = [], error
  while e is not None and all(e is not c for c in chain):
    chain.append(e)
    e = e.__cause__ or e.__context__
  for e in chain:
    if isinstance(e, PermissionError):
      return True
    match = _OS_ERROR_CODE.search(str(e))
    if match and int(match.group(1)) in (errno.EACCES, errno.EPERM):
      return True
  return False


def _unreadable_error(path, error):
  return UnreadableCheckpointError(
      f"cannot read {path}: {describe_error(error)}; left it where it is "
      f"(it may be intact: make it readable to resume from it)")


def _check_meta(meta, step=None):
  """Raises CorruptCheckpointError unless `meta` (a dict; its meta_sha256
  is left in place) matches its checksum and, given `step`, records that
  step. Reads nothing else, so it can vet a config before any model is
  built."""
  recorded = meta.get("meta_sha256")
  if recorded is not None and recorded != _sha256(
      {k: v for k, v in meta.items() if k != "meta_sha256"}):
    raise CorruptCheckpointError("meta does not match its checksum")
  if step is not None and "step" in meta and meta["step"] != int(step):
    raise CorruptCheckpointError(
        f"is not the checkpoint of step {step}: its meta records step "
        f"{meta['step']}")


def _verify_step(step, meta, tree):
  """Binds a checkpoint to its step: the directory's step, meta's step and
  the restored state's step must agree (a copy of another step, or a state
  saved under another number, is corrupt)."""
  x = tree["step"]
  shards = getattr(x, "addressable_shards", None)
  state_step = int(np.asarray(shards[0].data if shards else x))
  meta_step = meta.get("step", step)
  if meta_step == int(step) == state_step:
    return
  said = [f"its meta records step {meta_step}"] if meta_step != step else []
  said.append(f"its state is at step {state_step}")
  raise CorruptCheckpointError(
      f"is not the checkpoint of step {step}: " + " and ".join(said))


def _verify(meta, tree):
  """Raises CorruptCheckpointError unless meta and the state arrays match
  what save() recorded. Checkpoints written before fingerprints existed (no
  'fingerprint' in meta) load unverified."""
  _check_meta(meta)
  if "fingerprint" in meta:
    names = [jax.tree_util.keystr(k) for k, _ in
             jax.tree_util.tree_flatten_with_path(tree)[0]]
    got, want = fingerprint(tree), list(meta["fingerprint"])
    if len(got) != len(want):
      raise CorruptCheckpointError(
          f"the state has {len(got)} arrays, meta records {len(want)}")
    bad = [n for n, g, w in zip(names, got, want) if g != w]
    if bad:
      raise CorruptCheckpointError(
          f"{len(bad)} state array(s) do not match their fingerprints "
          f"(first: {bad[0]})")


def _data_state(iterator):
  """The iterator's state as the JSON object grain writes."""
  state = iterator.get_state()
  return json.loads(state.decode()) if isinstance(state, bytes) else state


def _verify_data_file(directory, digest):
  """The single process's data-iterator JSON must hash to `digest` (the
  iterator's get_state() when saved). Restored iterators re-derive part of
  their state lazily, so the file is checked, not the iterator."""
  path = os.path.join(directory, "process_0-of-1.json")
  try:
    with open(path) as f:
      state = json.load(f)
  except (OSError, ValueError) as e:
    raise CorruptCheckpointError(
        f"the data iterator position does not load: {describe_error(e)}") from e
  if _sha256(state) != digest:
    raise CorruptCheckpointError(
        "the data iterator position does not match its checksum")


def read_saved_config(directory):
  """(config dict, step) from the newest checkpoint step under `directory`
  whose meta is readable JSON, matches its checksum and records that step,
  or (None, None). Reads files only: it vets the config of a resume before
  anything is built; restore_latest verifies (and reports) the rest."""
  try:
    names = os.listdir(directory)
  except OSError:
    return None, None
  steps = sorted((int(n) for n in names if n.isdigit()), reverse=True)
  for step in steps:
    path = os.path.join(directory, str(step), META, "metadata")
    try:
      with open(path) as f:
        meta = json.load(f)
    except (OSError, ValueError):
      continue
    if not isinstance(meta, dict):
      continue
    try:
      _check_meta(meta, step)
    except CorruptCheckpointError:
      continue
    if isinstance(meta.get("config"), dict):
      return meta["config"], step
  return None, None


def write_json_atomic(path, obj):
  """Writes JSON to `path` via a temporary file and a rename. If that fails
  (a full disk), `path` is as it was and the temporary file is removed."""
  tmp = f"{path}.tmp.{os.getpid()}"
  try:
    with open(tmp, "w") as f:
      json.dump(obj, f, indent=2, sort_keys=True)
      f.write("\n")
    os.replace(tmp, path)
  except BaseException:
    try:
      os.remove(tmp)
    except OSError:
      pass
    raise


def save_config(config, workdir):
  """workdir/config.json: the run's full config (ml_collections ConfigDict or
  dict)."""
  as_dict = config.to_dict() if hasattr(config, "to_dict") else dict(config)
  path = os.path.join(workdir, "config.json")
  write_json_atomic(path, json.loads(json.dumps(as_dict, default=str)))
  return path
