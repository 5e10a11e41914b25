"""The router study's family runs (issue 16): each config validates and
builds its model (shapes only), with the family's module in place."""

import importlib.util
import pathlib

from flax import nnx
import pytest

from moejax import models
from moejax.train import loop

ROOT = pathlib.Path(__file__).resolve().parents[2]


def _study():
  path = ROOT / "experiments" / "configs" / "router_study.py"
  spec = importlib.util.spec_from_file_location("router_study_families", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


STUDY = _study()
WANT = {"top2_global": "MoELayer", "top_p": "TopPRouter",
        "null_experts": "NullExpertRouter", "evomoe": "DenseToSparseRouter",
        "stablemoe": "StableMoERouter", "lory": "LoryLayer",
        "smear": "SMEARLayer", "mod": "MoDBlock", "moa": "MoAAttention",
        "switchhead": "SwitchHeadAttention", "lora": "LoRAExpertsFFN"}


@pytest.mark.parametrize("router", STUDY.FAMILY_ROUTERS)
def test_family_config_builds(router):
  config = STUDY.get_config(f"router={router}")
  loop.validate_config(config, num_devices=1)
  model = nnx.eval_shape(loop.model_factory(config))
  names = {type(m).__name__ for _, m in nnx.iter_modules(model)}
  names |= {type(getattr(m, "router", None)).__name__
            for _, m in nnx.iter_modules(model)}
  assert WANT[router] in names
  counts = models.count_params(model)
  assert 0 < counts["active"] <= counts["total"]
  assert models.flops_per_token(model, config.data.seq_len) > 0
  assert "DecoderLM" in models.describe(model, seq_len=config.data.seq_len)
  if router == "top2_global":
    assert model.blocks[1].ffn.balance_scope == "global"
