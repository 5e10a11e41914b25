"""Runs that start from existing weights (moejax/train/init_from.py):
fine-tuning a pretrained fixture (full, router-only, frozen experts) and
upcycling a dense run into an MoE run."""

import importlib.util
import io
import os

from flax import nnx
import jax.numpy as jnp
import numpy as np
import pytest

from moejax import models
from moejax import train
from moejax.layers import params as params_lib
from moejax.train import init_from as init_from_lib
from moejax.train import loop

REPO = os.path.dirname(os.path.dirname(os.path.dirname(__file__)))
OLMOE = os.path.join(REPO, "tests", "models", "fixtures", "olmoe")


def _config(name, arg):
  path = os.path.join(REPO, "experiments", "configs", f"{name}.py")
  spec = importlib.util.spec_from_file_location(name, path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg)


def _finetune(tmp_path, trainable, steps=2, stop_after=0):
  c = _config("finetune", f"{trainable},size=smoke")
  c.init_from.path = OLMOE
  c.data.data_dir = str(tmp_path / "data")
  c.num_train_steps, c.checkpoint_every, c.eval_every = steps, 1, 0
  c.stop_after_steps = stop_after
  c.optimizer.learning_rate = 1e-2  # a visible change in two steps
  return c


def _flat(model, kind=nnx.Param):
  return {"/".join(map(str, k)): np.asarray(v.get_value()) for k, v in
          nnx.to_flat_state(nnx.state(model, kind))}


def _weights(model):
  """Every parameter, trained or frozen, by path."""
  out = _flat(model, nnx.Param)
  out.update(_flat(model, params_lib.FrozenParam))
  return out


@pytest.mark.parametrize("trainable,trained", [
    ("router", lambda path: "router" in path),
    ("non_experts", lambda path: "experts" not in path),
])
def test_only_the_trainable_parameters_train_and_have_optimizer_state(
    tmp_path, trainable, trained):
  c = _finetune(tmp_path, trainable)
  model = loop.model_factory(c)()
  params = _flat(model)
  assert params and all(trained(p) for p in params)
  frozen = _flat(model, params_lib.FrozenParam)
  assert frozen and not any(trained(p) for p in frozen)
  out = io.StringIO()
  train.train_and_evaluate(c, str(tmp_path / "run"), stream=out)
  assert "initialised from" in out.getvalue()
  assert "0 left at their initialisation" in out.getvalue()
  before = _weights(models.from_pretrained(OLMOE))
  after = _weights(train.load_model(str(tmp_path / "run")))
  assert set(before) == set(after)
  changed = {p for p in before if not np.array_equal(before[p], after[p])}
  assert changed and all(trained(p) for p in changed), sorted(changed)[:3]
  # A router-only run leaves every expert and attention weight bitwise.
  assert all(np.array_equal(before[p], after[p]) for p in before
             if not trained(p))


def test_full_fine_tuning_starts_at_the_checkpoint_and_resumes(tmp_path):
  # 3 steps, stopped after 2; the rerun resumes from its own checkpoint
  # (init_from is not read again) and finishes.
  c = _finetune(tmp_path, "all", steps=3, stop_after=2)
  workdir = str(tmp_path / "run")
  first = io.StringIO()
  train.train_and_evaluate(c, workdir, stream=first)
  assert "initialised from" in first.getvalue()
  second = io.StringIO()
  train.train_and_evaluate(c, workdir, stream=second)
  assert "resumed from" in second.getvalue()
  assert "initialised from" not in second.getvalue()
  final = _weights(train.load_model(workdir))
  start = _weights(models.from_pretrained(OLMOE))
  assert any(not np.array_equal(final[p], start[p]) for p in start)


def test_the_tokenized_corpus_feeds_the_checkpoint_vocabulary(tmp_path):
  c = _finetune(tmp_path, "all")
  train_ds, _ = loop.make_datasets(c)
  batch = next(iter(train_ds))
  assert batch["inputs"].shape == (8, 32)
  assert batch["inputs"].max() < 128  # the fixture's vocabulary


def test_config_errors_name_the_field(tmp_path):
  c = _finetune(tmp_path, "all")
  c.trainable = "experts"
  c.init_from.mode = "merge"
  with pytest.raises(train.ConfigError) as e:
    loop.validate_config(c)
  text = str(e.value)
  assert "config.trainable='experts'" in text
  assert "config.init_from.mode='merge'" in text
  c = _finetune(tmp_path, "all")
  c.init_from.path = str(tmp_path / "missing")
  with pytest.raises(train.ConfigError, match=r"config.init_from.path="):
    loop.validate_config(c)


def test_upcycling_a_dense_run_starts_at_the_dense_model(tmp_path):
  # A 2-step dense run, then the upcycle config's state filled from it: the
  # MoE model (renormalised top-2, dropless) gives the dense logits.
  dense_cfg = _config("lm_stdlib", "dense,size=smoke")
  dense_cfg.data.data_dir = str(tmp_path / "data")
  dense_cfg.num_train_steps, dense_cfg.eval_every = 2, 0
  dense_cfg.optimizer.warmup_steps = 1
  dense_dir = str(tmp_path / "dense")
  train.train_and_evaluate(dense_cfg, dense_dir, stream=io.StringIO())

  c = _config("upcycle", "size=smoke")
  c.init_from.path = dense_dir
  c.data.data_dir = dense_cfg.data.data_dir
  from moejax.train import state as state_lib  # pylint: disable=g-import-not-at-top
  import optax  # pylint: disable=g-import-not-at-top
  mesh = state_lib.make_train_mesh({"data": -1})
  graphdef, state, _ = state_lib.create_train_state(
      loop.model_factory(c), optax.sgd(0.1), mesh)
  state, report = init_from_lib.fill_state(graphdef, state, c.init_from)
  assert report["broadcast"] and not any(
      "router" not in p for p in report["initialised"])
  moe = nnx.merge(graphdef, state.params, state.model_state)
  dense = train.load_model(dense_dir)
  tokens_BL = jnp.asarray((np.arange(64).reshape(2, 32) * 5) % 257)
  moe.eval()
  dense.eval()
  np.testing.assert_allclose(moe(tokens_BL)[0], dense(tokens_BL)[0],
                             rtol=2e-5, atol=2e-5)
  # And the config trains from there.
  c.num_train_steps, c.eval_every = 2, 0
  c.optimizer.warmup_steps = 1
  out = io.StringIO()
  train.train_and_evaluate(c, str(tmp_path / "upcycled"), stream=out)
  assert "upcycled into experts" in out.getvalue()


def test_fine_tuning_on_the_users_text_files(tmp_path):
  docs = tmp_path / "docs"
  docs.mkdir()
  for i in range(4):
    (docs / f"d{i}.txt").write_text(f"fine-tuning text number {i}\n" * 60)
  c = _finetune(tmp_path, "router", steps=2)
  c.data.dataset, c.data.source_dir = "text_files", str(docs)
  c.data.validation_fraction = 0.5
  out = io.StringIO()
  train.train_and_evaluate(c, str(tmp_path / "run"), stream=out)
  assert "initialised from" in out.getvalue()
  c.data.source_dir = str(tmp_path / "nowhere")
  with pytest.raises(train.ConfigError, match="config.data.source_dir="):
    loop.validate_config(c)
