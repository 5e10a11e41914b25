"""Routing statistics (moejax.inference.route_stats)."""

from flax import nnx
import jax
import numpy as np
import pytest

from moejax import models
from moejax.inference import route_stats as rs

V, M, LAYERS, HEADS, H, E = 13, 8, 2, 2, 16, 4


def _lm(engine="dropless", router=None, **fields):
  moe = {"router": router or {"name": "token_choice", "k": 2},
         "engine": {"name": engine}, "experts": {"num_experts": E}}
  moe.update(fields)
  return models.DecoderLM(V, M, LAYERS, HEADS, H, moe_every=1, moe=moe,
                          activation="relu", rngs=nnx.Rngs(0))


def test_hand_computed_layer_stats():
  # B=1, L=4, E=3, k=1: tokens choose experts 0, 0, 0, 1.
  chosen_BLE = np.zeros((1, 4, 3), bool)
  chosen_BLE[0, [0, 1, 2, 3], [0, 0, 0, 1]] = True
  probs_BLE = np.full((1, 4, 3), 1 / 3, np.float32)  # uniform: entropy log 3
  trace = rs.LayerTrace(chosen_BLE, probs_BLE, k=1, group_size=4)
  mask_BL = np.ones((1, 4), bool)
  split_BL = np.array([[False, False, True, True]])  # prompt = first 2
  stats = rs.layer_stats(trace, mask_BL, capacity_factor=1.0,
                         split_BL=split_BL)
  np.testing.assert_allclose(stats["load_E"], [0.75, 0.25, 0.0])
  assert stats["max_over_mean_load"] == pytest.approx(2.25)
  assert stats["entropy"] == pytest.approx(np.log(3))
  # C = ceil(1 * 1.0 * 4 / 3) = 2: expert 0 is asked 3 times, drops 1 of 4.
  assert stats["drop_fraction"] == pytest.approx(0.25)
  # Prompt [1, 0, 0], continuation [0.5, 0.5, 0]: TV = 0.5.
  np.testing.assert_allclose(stats["prompt_load_E"], [1, 0, 0])
  np.testing.assert_allclose(stats["continuation_load_E"], [0.5, 0.5, 0])
  assert stats["shift_tv"] == pytest.approx(0.5)
  # Padding the last token away: load [1, 0, 0], nothing dropped (3 > C=2
  # still drops 1 of 3).
  mask_BL[0, 3] = False
  stats = rs.layer_stats(trace, mask_BL, capacity_factor=1.0)
  np.testing.assert_allclose(stats["load_E"], [1, 0, 0])
  assert stats["drop_fraction"] == pytest.approx(1 / 3)


def test_hand_computed_coactivation():
  # T=3 tokens, k=2 of E=3: {0,1}, {0,2}, {0,1}.
  chosen_TE = np.array([[1, 1, 0], [1, 0, 1], [1, 1, 0]], bool)
  want_EE = np.array([[1, 2 / 3, 1 / 3],   # given 0 (3 tokens)
                      [1, 1, 0],           # given 1 (2 tokens)
                      [1, 0, 1]])          # given 2 (1 token)
  np.testing.assert_allclose(rs.coactivation(chosen_TE), want_EE)


@pytest.mark.parametrize("engine,fields", [("dropless", {}),
                                           ("indices",
                                            {"capacity_factor": 1.0})])
def test_trace_matches_the_layers_own_metrics(engine, fields):
  model = _lm(engine, **fields)
  tokens_BL = jax.random.randint(jax.random.key(1), (2, 8), 0, V)
  mask_BL = np.ones((2, 8), bool)
  mask_BL[1, 6:] = False
  want_BLV, aux = model(tokens_BL, padding_mask_BL=mask_BL,
                        deterministic=True)
  got_BLV, traces = rs.trace_routing(model, tokens_BL,
                                     padding_mask_BL=mask_BL)
  # Tracing changes nothing, and the routers are put back.
  np.testing.assert_array_equal(got_BLV, want_BLV)
  assert all(type(b.ffn.router).__name__ == "TokenChoiceRouter"
             for b in model.blocks)
  assert len(traces) == LAYERS
  for i, trace in enumerate(traces):
    # k=2 distinct experts per real token, none for padding.
    np.testing.assert_array_equal(trace.chosen_BLE.sum(-1),
                                  np.where(mask_BL, 2, 0))
    stats = rs.layer_stats(trace, mask_BL, capacity_factor=1.0)
    assert stats["entropy"] == pytest.approx(
        float(aux.metrics.router_entropy[i]), rel=1e-5)
    if engine == "dropless":
      np.testing.assert_allclose(stats["load_E"],
                                 aux.metrics.expert_load_E[i], rtol=1e-5)
    else:
      # The estimate at the layer's own capacity factor is what it dropped.
      assert stats["drop_fraction"] == pytest.approx(
          float(aux.metrics.dropped_fraction[i]), abs=1e-6)


def test_expert_choice_plans_read_the_slot_view():
  model = _lm("indices", router={"name": "expert_choice"},
              capacity_factor=1.0, allow_non_causal=True)
  tokens_BL = jax.random.randint(jax.random.key(2), (1, 8), 0, V)
  _, traces = rs.trace_routing(model, tokens_BL)
  # C = 8 * 1.0 / 4 = 2 tokens per expert: E * C picks in all.
  for trace in traces:
    assert trace.chosen_BLE.sum() == E * 2
    np.testing.assert_array_equal(trace.chosen_BLE.sum((0, 1)), [2] * E)


def test_a_dense_model_has_nothing_to_trace():
  dense = models.DecoderLM(V, M, LAYERS, HEADS, H, moe_every=0,
                           rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="DecoderLM has no MoE layer to trace"):
    rs.trace_routing(dense, np.zeros((1, 4), np.int32))
