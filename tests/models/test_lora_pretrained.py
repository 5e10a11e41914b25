"""LoRA experts (moejax/layers/lora_experts.py) over a loaded pretrained
model: the committed dense Qwen3 fixture (its dense MLPs, the default
select) and the all-MoE OLMoE fixture (whole MoE layers as the frozen FFN).
Step 0 is the checkpoint, only adapters and routers are Params and have
optimizer state, and training leaves the checkpoint's weights bitwise."""

import os

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from moejax import layers as L
from moejax.layers import build as build_lib
from moejax.layers import lora_experts as le
from moejax.layers import moe as moe_lib
from moejax.models import hf
from moejax.routing.validation import OptionError
from moejax.train import optim

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures")
MOE_LAYER = "moejax.layers.moe.MoELayer"
# fixture -> (select, the wrapped module class)
CASES = {"qwen3": (None, L.DenseFFN), "olmoe": (MOE_LAYER, moe_lib.MoELayer)}
ADAPTER_LEAVES = ("a_EMR", "b_ERM", "w_router_ME")


def _inputs(name):
  d = np.load(os.path.join(FIXTURES, name, "inputs.npz"))
  return jnp.asarray(d["ids_BL"]), jnp.asarray(d["mask_BL"])


def _flat(model, kind):
  return {"/".join(map(str, k)): np.asarray(v.get_value()) for k, v in
          nnx.to_flat_state(nnx.state(model, kind))}


@nnx.jit
def _forward(model, ids_BL, mask_BL):
  return model(ids_BL, padding_mask_BL=mask_BL)


def _wrapped(name, **options):
  model = hf.from_pretrained(os.path.join(FIXTURES, name))
  select, _ = CASES[name]
  options = {"num_experts": 3, "rank": 4, "k": 2, "select": select,
             **options}
  return le.apply_lora_experts(model, rngs=nnx.Rngs(1), **options)


@pytest.mark.parametrize("name", sorted(CASES))
def test_step_0_is_the_pretrained_model_exactly(name):
  ids_BL, mask_BL = _inputs(name)                           # [2, 8]
  plain = hf.from_pretrained(os.path.join(FIXTURES, name))
  want_BLV, want_aux = _forward(plain, ids_BL, mask_BL)
  model = _wrapped(name)
  _, cls = CASES[name]
  for block in model.blocks:  # every block's FFN of that class is wrapped
    assert isinstance(block.ffn, le.LoRAExpertsFFN) == isinstance(
        build_lib.wrapped_base(block.ffn), cls)
    assert isinstance(block.ffn, le.LoRAExpertsFFN)
  got_BLV, got_aux = _forward(model, ids_BL, mask_BL)
  np.testing.assert_array_equal(got_BLV, want_BLV)
  # A wrapped MoE layer still reports its routing (aux passes through).
  assert (got_aux is None) == (want_aux is None)
  if want_aux is not None:
    jax.tree.map(np.testing.assert_array_equal, got_aux, want_aux)


def test_a_wrapped_moe_model_decodes_with_its_kv_cache():
  # The cached decode calls the MoE layer with no_drop=True: the wrapper
  # passes it on; at B = 0 greedy decoding gives transformers' tokens
  # (generated_1N, written by the fixture script).
  from moejax.inference import decoding  # pylint: disable=g-import-not-at-top
  d = np.load(os.path.join(FIXTURES, "olmoe", "inputs.npz"))
  prompt_1L, want_1N = d["prompt_1L"], d["generated_1N"]  # [1, 6], [1, 14]
  model = _wrapped("olmoe")
  got_1N = decoding.generate(model, jnp.asarray(prompt_1L),
                             max_new_tokens=want_1N.shape[1]
                             - prompt_1L.shape[1])
  np.testing.assert_array_equal(np.asarray(got_1N), want_1N)


@pytest.mark.parametrize("name", sorted(CASES))
def test_only_adapters_and_routers_are_params_and_have_optimizer_state(name):
  plain = hf.from_pretrained(os.path.join(FIXTURES, name))
  pretrained = _flat(plain, nnx.Param)
  model = _wrapped(name)
  params = _flat(model, nnx.Param)
  frozen = _flat(model, le.FrozenParam)
  # 2 blocks x (A, B, router) and nothing else trains.
  assert len(params) == 6 and all(
      p.rsplit("/", 1)[-1] in ADAPTER_LEAVES for p in params), sorted(params)
  # Every pretrained weight is frozen, by its path inside the wrapper.
  with build_lib.unwrapped(model):
    unwrapped_frozen = _flat(model, le.FrozenParam)
    assert not _flat(model, nnx.Param)  # the wrappers' own are absent here
  assert set(unwrapped_frozen) == set(pretrained)
  assert len(frozen) == len(pretrained)
  for path, value in pretrained.items():
    np.testing.assert_array_equal(unwrapped_frozen[path], value)
  # The optimizer the trainer builds (moejax/train/trainer.py, state.py:
  # tx.init of the nnx.Param split) holds state for the adapters only.
  tx = optim.make_optimizer(optim.make_schedule(
      learning_rate=1e-2, total_steps=10, warmup_steps=1))
  _, param_state, _ = nnx.split(model, nnx.Param, ...)
  opt_state = tx.init(param_state.to_pure_dict())
  adam = [s for s in jax.tree.leaves(
      opt_state, is_leaf=lambda x: isinstance(x, optax.ScaleByAdamState))
          if isinstance(s, optax.ScaleByAdamState)]
  assert len(adam) == 1
  sizes = sum(v.size for v in jax.tree.leaves(adam[0].mu))
  assert sizes == sum(v.size for v in params.values())
  assert sizes < sum(v.size for v in frozen.values()) / 4


@pytest.mark.parametrize("name", sorted(CASES))
def test_gradient_steps_move_adapters_and_leave_the_checkpoint_bitwise(name):
  ids_BL, mask_BL = _inputs(name)
  model = _wrapped(name)
  frozen_before = _flat(model, le.FrozenParam)
  params_before = _flat(model, nnx.Param)
  opt = nnx.Optimizer(model, optax.adam(1e-2), wrt=nnx.Param)

  def loss(m):
    logits_BLV, _ = m(ids_BL, padding_mask_BL=mask_BL)
    ce = optax.softmax_cross_entropy_with_integer_labels(
        logits_BLV[:, :-1], ids_BL[:, 1:])
    return (ce * mask_BL[:, 1:]).sum() / mask_BL[:, 1:].sum()

  @nnx.jit
  def step(model, opt):
    value, grads = nnx.value_and_grad(loss)(model)
    opt.update(model, grads)
    return value

  # Step 1 moves B only (A's and the router's gradients carry a factor B =
  # 0); steps 2 and 3 move all three.
  losses = [float(step(model, opt)) for _ in range(3)]
  after = _flat(model, nnx.Param)
  assert all(not np.array_equal(after[p], params_before[p])
             for p in params_before), "an adapter or router did not move"
  frozen_after = _flat(model, le.FrozenParam)
  assert set(frozen_after) == set(frozen_before)
  for path, value in frozen_before.items():
    np.testing.assert_array_equal(frozen_after[path], value, err_msg=path)
  assert losses[-1] < losses[0]


def test_the_default_wraps_dense_mlps_not_shared_experts():
  # DeepSeek-V2 fixture: layer 0 dense (first_k_dense_replace), layer 1 MoE
  # with a shared expert (a DenseFFN inside the MoE layer, left alone);
  # both, with the MoE layer whole, when select names both classes.
  path = os.path.join(FIXTURES, "deepseek_v2")
  model = le.apply_lora_experts(hf.from_pretrained(path), rngs=nnx.Rngs(0))
  assert isinstance(model.blocks[0].ffn, le.LoRAExpertsFFN)
  assert isinstance(model.blocks[1].ffn, moe_lib.MoELayer)
  assert isinstance(model.blocks[1].ffn.shared, L.DenseFFN)
  model = le.apply_lora_experts(
      hf.from_pretrained(path), rngs=nnx.Rngs(0),
      select=["moejax.layers.ffn.DenseFFN", MOE_LAYER])
  assert [type(b.ffn.shared) for b in model.blocks] == [L.DenseFFN,
                                                        moe_lib.MoELayer]
  assert isinstance(model.blocks[1].ffn.shared.shared, L.DenseFFN)
  # The same, comma-separated (a config's string).
  model = le.apply_lora_experts(
      hf.from_pretrained(path), rngs=nnx.Rngs(0),
      select=f"moejax.layers.ffn.DenseFFN, {MOE_LAYER}")
  assert [type(b.ffn.shared) for b in model.blocks] == [L.DenseFFN,
                                                        moe_lib.MoELayer]


@pytest.mark.parametrize("options,match", [
    # OLMoE has no dense MLP: the default selects nothing and says what to
    # pass.
    (dict(select=None), "no DenseFFN outside an MoE layer.*select="
     "'moejax.layers.moe.MoELayer'"),
    (dict(select="moejax.layers.moe.NoSuchLayer"),
     "select='moejax.layers.moe.NoSuchLayer' is not an importable class"),
    (dict(select="moejax.layers.ffn.ACTIVATIONS"), "not an importable class"),
    (dict(select=3), "select=3: dotted class paths"),
    (dict(select=[]), r"select=\[\]: dotted class paths"),
    (dict(select=lambda path, module: False), "select=<lambda>: no module of "
     "this HFDecoder was selected"),
    (dict(rank=0), "rank"),
    (dict(k=5), "k"),
    (dict(alpha=0.0), "alpha"),
])
def test_bad_options_are_one_clear_line_and_leave_the_model_alone(options,
                                                                  match):
  model = hf.from_pretrained(os.path.join(FIXTURES, "olmoe"))
  before = len(_flat(model, nnx.Param))
  with pytest.raises(OptionError, match=match) as err:
    le.apply_lora_experts(model, rngs=nnx.Rngs(0),
                          **{"select": MOE_LAYER, **options})
  assert "\n" not in str(err.value)
  # Nothing was frozen or wrapped.
  assert len(_flat(model, nnx.Param)) == before
  assert not _flat(model, le.FrozenParam)


def test_config_wrappers_on_the_pretrained_architecture():
  # model.wrappers of a 'pretrained' config reach the architecture; a bad
  # option is a MoEConfigError on its field.
  path = os.path.join(FIXTURES, "olmoe")
  model = hf.architecture(path, rngs=nnx.Rngs(0), wrappers={
      "lora_experts": {"select": MOE_LAYER, "rank": 2}})
  assert all(isinstance(b.ffn, le.LoRAExpertsFFN) for b in model.blocks)
  with pytest.raises(L.MoEConfigError,
                     match=r"model\.wrappers\.lora_experts\.rank"):
    hf.architecture(path, rngs=nnx.Rngs(0), wrappers={
        "lora_experts": {"select": MOE_LAYER, "rank": -1}})
  with pytest.raises(L.MoEConfigError,
                     match=r"model\.wrappers\.lora_experts\.select"):
    hf.architecture(path, rngs=nnx.Rngs(0), wrappers={"lora_experts": {}})
