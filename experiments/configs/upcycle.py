r"""Sparse upcycling: an MoE LM that starts from the dense baseline's weights.

  # the dense baseline (FLOP-matched twin of the default MoE LM)
  python -m experiments.train --config=experiments/configs/lm_stdlib.py:dense \
      --workdir=workdirs/lm_stdlib_dense
  # its MoE upcycling: every FFN copied into 8 experts, routers fresh
  python -m experiments.train --config=experiments/configs/upcycle.py \
      --workdir=workdirs/lm_stdlib_upcycled

The model is lm_stdlib's architecture with MoE in every layer at the dense
baseline's FFN width (so each expert holds a full copy), top-2 with
renormalised weights and the dropless engine: at step 0 it computes exactly
the dense model (moejax.models.upcycle; tests/models/test_upcycle.py).
init_from.drop_ratio > 0 is Drop-Upcycling (Nakamura et al. 2025).

get_config(arg): size: small (default) | smoke. Drop-Upcycling:
--config.init_from.drop_ratio=0.5.
"""

from moejax.train import config as config_lib

from experiments.configs import lm_stdlib


def get_config(arg=None):
  size = config_lib.parse_arg(arg, size=("small", "smoke"))["size"]
  c = lm_stdlib.get_config(f"dense,size={size}")
  width = c.model.mlp_dim  # the dense FFN width: each expert's H
  c.model.moe_every = 1
  c.moe = config_lib.moe_config(
      router=dict(name="token_choice", k=2, gating="softmax",
                  renormalize=True, jitter_eps=0.0),
      engine=dict(name="dropless"),
      experts=dict(num_experts=4 if size == "smoke" else 8,
                   hidden_dim=width),
      shared=dict(num_experts=0))
  c.init_from.path = ("workdirs/lm_stdlib_dense_smoke" if size == "smoke"
                      else "workdirs/lm_stdlib_dense")
  c.init_from.mode = "upcycle"
  c.baseline_workdir = c.init_from.path
  return c
