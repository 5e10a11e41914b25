"""Helpers the in-process config tests share (not a test module): the
shipped configs, validate_config's problem lines, and a compile listener."""

import importlib.util
import os

import jax
import pytest

from moejax import train
from moejax.train import validation

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(
    __file__))))


def config_module(name):
  """experiments/configs/<name>.py, loaded as a module."""
  path = os.path.join(REPO, "experiments", "configs", f"{name}.py")
  spec = importlib.util.spec_from_file_location(name, path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def lm(arg="size=smoke"):
  return config_module("lm_stdlib").get_config(arg)


def problems(config, num_devices=8):
  """validate_config's problem lines; fails the test if it raises none."""
  with pytest.raises(train.ConfigError) as info:
    validation.validate_config(config, num_devices=num_devices,
                               process_count=1)
  return info.value.problems


def one(config, field, *fragments, num_devices=8):
  """Exactly one problem, about `field`, containing every fragment."""
  lines = problems(config, num_devices)
  assert len(lines) == 1, lines
  text = lines[0]
  assert text.startswith(f"config.{field}="), text
  for fragment in fragments:
    assert fragment in text, (fragment, text)
  return text


def compiles(fn):
  """Runs fn(); returns the compilation events it caused (lowering or
  backend compiles; validation traces the model abstractly, which is not
  compiling)."""
  compiled = []

  def listen(event, duration, **kwargs):
    del duration, kwargs
    if "compile" in event and "jaxpr_trace" not in event:
      compiled.append(event)
  jax.monitoring.register_event_duration_secs_listener(listen)
  try:
    fn()
  finally:
    jax.monitoring.unregister_event_duration_listener(listen)
  return compiled
