"""Decoding with a KV cache (moejax.inference.generate, moejax.layers.kv_cache).

The fixtures are the tiny transformers checkpoints of tests/models/fixtures;
their expected.json holds transformers' greedy `generate` of 8 new tokens
from one unpadded prompt (experiments/fixtures/make_hf_fixtures.py).
"""

import functools
import json
import os

from flax import nnx
import jax.numpy as jnp
import numpy as np
import pytest

from moejax import inference
from moejax import models
from moejax.inference import decoding as generate_lib
from moejax.layers import kv_cache

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures")
FAMILIES = ("mixtral", "olmoe", "qwen2_moe", "qwen3_moe", "deepseek_v3",
            "deepseek_v2", "deepseek_v2_lite", "gpt_oss", "jetmoe")


@functools.cache
def load(name):
  return models.from_pretrained(os.path.join(FIXTURES, name))


def expected(name):
  with open(os.path.join(FIXTURES, name, "expected.json")) as f:
    return json.load(f)


full_forward = nnx.jit(lambda model, ids_BL, mask_BL, pos_BL: model(
    ids_BL, padding_mask_BL=mask_BL, positions_BL=pos_BL)[0])


@pytest.mark.parametrize("name", FAMILIES)
def test_greedy_generation_equals_transformers(name):
  want = expected(name)
  prompt_1L = np.asarray(want["prompt_1L"], np.int32)
  got = inference.generate(load(name), prompt_1L, max_new_tokens=8)
  np.testing.assert_array_equal(got, np.asarray(want["generated_1N"])[:, :
                                                                      prompt_1L.shape[1] + 8])


@pytest.mark.parametrize("name", ["qwen3_moe", "deepseek_v2", "gpt_oss",
                                  "jetmoe"])
def test_every_cached_step_equals_the_argmax_of_a_full_recompute(name):
  # B=2, L=5, row 1 left-padded by 2; N=9 new tokens. GPT-OSS's sliding
  # layers (window 4) then decode from a rolling cache of 4 slots.
  model = load(name)
  prompt_BL = np.array([[5, 17, 33, 64, 9], [0, 0, 12, 90, 45]], np.int32)
  mask_BL = np.array([[1, 1, 1, 1, 1], [0, 0, 1, 1, 1]], bool)
  out_BT = np.asarray(inference.generate(model, prompt_BL, max_new_tokens=9,
                                         padding_mask_BL=mask_BL))
  # One causal recompute of the whole sequence: its logits at position t - 1
  # see tokens < t only, so their argmax is what step t should have chosen.
  m_BT = np.concatenate([mask_BL, np.ones((2, 9), bool)], axis=1)
  pos_BT = generate_lib.prompt_positions(jnp.asarray(m_BT))
  logits_BTV = full_forward(model, out_BT, m_BT, pos_BT)
  np.testing.assert_array_equal(np.argmax(logits_BTV[:, 4:-1], -1),
                                out_BT[:, 5:])


def test_a_left_padded_row_decodes_as_it_would_alone():
  model = load("mixtral")
  alone_1T = inference.generate(model, np.array([[12, 90]], np.int32),
                                max_new_tokens=6)
  batch_BT = inference.generate(
      model, np.array([[5, 17, 33], [0, 12, 90]], np.int32),
      max_new_tokens=6, padding_mask_BL=np.array([[1, 1, 1], [0, 1, 1]],
                                                 bool))
  assert alone_1T.shape == (1, 8) and batch_BT.shape == (2, 9)
  np.testing.assert_array_equal(alone_1T[0, 2:], batch_BT[1, 3:])


def test_sliding_window_layers_keep_a_rolling_cache_of_w_slots():
  model = load("gpt_oss")
  cache = model.init_cache(2, 40)
  windows = [block.attention.window for block in model.blocks]
  assert windows == [4, None]  # sliding, then full
  assert [c.num_slots for c in cache] == [4, 40]


def test_cache_memory_matches_its_formula():
  # GQA: B * T * K * (D + D) values + B * T positions (int32).
  model = load("qwen3_moe")
  spec = model.spec.attention
  b, t = 3, 20
  want = sum(b * t * (2 * spec.num_kv_heads * spec.head_dim * 4 + 4)
             for _ in model.blocks)
  assert sum(c.nbytes() for c in model.init_cache(b, t)) == want
  # MLA caches C + R numbers per token, not N * (Dn + Dr + Dv).
  mla = load("deepseek_v3")
  s = mla.spec.attention
  want = sum(b * t * ((s.kv_lora_rank + s.qk_rope_head_dim) * 4 + 4)
             for _ in mla.blocks)
  assert sum(c.nbytes() for c in mla.init_cache(b, t)) == want
  # MoA (JetMoE): its K shared key/value heads, as GQA; nothing per expert.
  moa = load("jetmoe")
  s = moa.spec.attention
  want = sum(b * t * (2 * s.num_kv_heads * s.head_dim * 4 + 4)
             for _ in moa.blocks)
  assert sum(c.nbytes() for c in moa.init_cache(b, t)) == want


def test_kv_cache_extend_by_hand():
  # B=1, T=3 slots, then 4 new tokens at positions 0..3 (L=4): only the
  # newest T=3 are written, position p in slot p % 3.
  cache = kv_cache.init(1, 3, {"k": ((1,), jnp.float32)})
  k_BL1 = jnp.array([[[10.], [11.], [12.], [13.]]])  # [B=1, L=4, 1]
  pos_BL = jnp.array([[0, 1, 2, 3]])
  entries, k_pos_BJ, cache = kv_cache.extend(cache, {"k": k_BL1}, pos_BL)
  np.testing.assert_array_equal(k_pos_BJ, [[-1, -1, -1, 0, 1, 2, 3]])
  assert entries["k"].shape == (1, 7, 1)
  np.testing.assert_array_equal(cache.pos_BT, [[3, 1, 2]])
  np.testing.assert_array_equal(cache.entries["k"][0, :, 0], [13, 11, 12])
  # Padding is neither attended (position -1) nor written.
  _, k_pos_BJ, after = kv_cache.extend(cache, {"k": k_BL1[:, :1]},
                                       jnp.array([[4]]),
                                       jnp.array([[False]]))
  np.testing.assert_array_equal(k_pos_BJ, [[3, 1, 2, -1]])
  np.testing.assert_array_equal(after.pos_BT, cache.pos_BT)



def test_kv_cache_extend_with_mask_by_hand():
  # B=1, T=4 slots holding positions 0, 1 (slots 2, 3 empty), then L=2 new
  # tokens at positions 2, 3: J = T + L = 6 keys at positions
  # [0, 1, -1, -1, 2, 3]; empty slots are never read.
  cache = kv_cache.init(1, 4, {"k": ((1,), jnp.float32)})
  _, _, cache = kv_cache.extend(cache, {"k": jnp.ones((1, 2, 1))},
                                jnp.array([[0, 1]]))
  new = {"k": jnp.ones((1, 2, 1))}
  pos_BL = jnp.array([[2, 3]])
  _, mask_BLJ, _ = kv_cache.extend_with_mask(cache, new, pos_BL)
  np.testing.assert_array_equal(mask_BLJ[0], [[1, 1, 0, 0, 1, 0],
                                              [1, 1, 0, 0, 1, 1]])
  # A sliding window of W=2: position p reads p - 1 and p only.
  _, mask_BLJ, _ = kv_cache.extend_with_mask(cache, new, pos_BL,
                                             sliding_window=2)
  np.testing.assert_array_equal(mask_BLJ[0], [[0, 1, 0, 0, 1, 0],
                                              [0, 0, 0, 0, 1, 1]])
  # Not causal (an encoder's cache): every written key, past or future.
  _, mask_BLJ, _ = kv_cache.extend_with_mask(cache, new, pos_BL,
                                             causal=False)
  np.testing.assert_array_equal(mask_BLJ[0], [[1, 1, 0, 0, 1, 1]] * 2)

def test_sampling_is_seeded_and_stops():
  model = load("olmoe")
  prompt = np.array([[1, 40, 7, 99]], np.int32)
  a = inference.generate(model, prompt, max_new_tokens=6, temperature=1.0,
                         top_p=0.9, rng=3)
  b = inference.generate(model, prompt, max_new_tokens=6, temperature=1.0,
                         top_p=0.9, rng=3)
  np.testing.assert_array_equal(a, b)
  greedy = np.asarray(inference.generate(model, prompt, max_new_tokens=6))
  stop = int(greedy[0, 5])  # the second new token
  stopped = np.asarray(inference.generate(model, prompt, max_new_tokens=6,
                                          stop_tokens=(stop,)))
  np.testing.assert_array_equal(stopped[0, :6], greedy[0, :6])
  assert (stopped[0, 6:] == stop).all()


def test_decoding_refuses_a_router_that_reads_the_whole_group():
  model = models.DecoderLM(
      13, 8, 2, 2, 16, moe_every=1, rngs=nnx.Rngs(0),
      moe={"router": {"name": "expert_choice"}, "engine": {"name": "indices"},
           "experts": {"num_experts": 4}, "allow_non_causal": True})
  with pytest.raises(ValueError, match="ExpertChoiceRouter chooses tokens "
                     "with the whole group in view"):
    inference.generate(model, np.zeros((1, 3), np.int32), max_new_tokens=2)


def test_bad_arguments_are_named():
  model = load("mixtral")
  with pytest.raises(ValueError, match="max_new_tokens must be an integer "
                     ">= 1, got 0"):
    inference.generate(model, np.zeros((1, 3), np.int32), max_new_tokens=0)
  with pytest.raises(ValueError, match="prompts must be left-padded"):
    inference.generate(model, np.zeros((1, 3), np.int32), max_new_tokens=1,
                       padding_mask_BL=np.array([[1, 1, 0]], bool))
  with pytest.raises(ValueError, match=r"top_k must be None or an integer in "
                     r"\[1, 128\], got 500"):
    inference.generate(model, np.zeros((1, 3), np.int32), max_new_tokens=1,
                       temperature=1.0, top_k=500)


def _own_lm(engine, *, scan_layers=False, **fields):
  # V=13, M=16, 4 layers (MoE every 2nd), 2 heads, H=32, E=4, top-2.
  moe = {"router": {"name": "token_choice", "k": 2},
         "engine": {"name": engine}, "experts": {"num_experts": 4}}
  moe.update(fields)
  return models.DecoderLM(13, 16, 4, 2, 32, moe_every=2, moe=moe,
                          scan_layers=scan_layers, rngs=nnx.Rngs(0))


@pytest.mark.parametrize("scan_layers", [False, True])
def test_own_lm_with_a_capacity_engine_decodes_without_dropping(scan_layers):
  # Decoding: indices engine at capacity factor 0.5 with groups of 8 tokens
  # (which would drop at training time); reference: the same weights with
  # the dropless engine, recomputed in full.
  tight = _own_lm("indices", scan_layers=scan_layers, capacity_factor=0.5,
                  group_size=8)
  spare = _own_lm("dropless", scan_layers=scan_layers)
  nnx.update(spare, nnx.state(tight))
  prompt_BL = np.array([[3, 1, 4, 1, 5], [0, 0, 9, 2, 6]], np.int32)
  mask_BL = np.array([[1, 1, 1, 1, 1], [0, 0, 1, 1, 1]], bool)
  out_BT = np.asarray(inference.generate(tight, prompt_BL, max_new_tokens=7,
                                         padding_mask_BL=mask_BL))
  m_BT = np.concatenate([mask_BL, np.ones((2, 7), bool)], axis=1)
  pos_BT = generate_lib.prompt_positions(jnp.asarray(m_BT))
  logits_BTV, _ = spare(out_BT, padding_mask_BL=m_BT, positions_BL=pos_BT,
                        deterministic=True)
  np.testing.assert_array_equal(np.argmax(logits_BTV[:, 4:-1], -1),
                                out_BT[:, 5:])
  if scan_layers:
    assert [c.pos_BT.shape for c in tight.init_cache(2, 12)] == [(2, 2, 12)] * 2
