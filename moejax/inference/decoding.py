"""generate: prefill once, then one jitted decode step per new token.

A model that decodes implements two methods:
  init_cache(batch_size, max_length) -> cache (a pytree of fixed shape);
  model(tokens_BL, positions_BL=..., padding_mask_BL=..., cache=cache)
      -> (logits_BLV, aux, cache): attends to the cached keys/values and
         the new ones, and returns the cache with the new ones written.

Prompts are left-padded: row b's real tokens sit at the right end of the
prompt, and its positions count only real tokens (0, 1, ...), so a padded
row decodes exactly as it would alone. Step t feeds the token chosen at
step t - 1 at the next position. Every MoE layer routes each new token on
its own: a router that needs the whole group (expert choice, BPR, BASE, Soft
MoE) is refused before anything runs.
"""

import functools
import weakref

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np

from moejax.inference import sampling
from moejax.layers import transformer as tfm


def check_decodable(model):
  """Raises ValueError naming the first MoE layer that cannot decode."""
  for path, module in nnx.iter_modules(model):
    if tfm.is_moe_ffn(module) and not getattr(module, "causal", True):
      router = getattr(module, "router", module)
      where = "/".join(str(p) for p in path)
      raise ValueError(
          f"{where}: {type(router).__name__} chooses tokens with the whole "
          f"group in view (later tokens included), so it cannot route one "
          f"new token at a time; decode a model with a token-choice router "
          f"(token_choice, deepseek, hash, ...)")
  if not callable(getattr(model, "init_cache", None)):
    raise ValueError(f"{type(model).__name__} has no init_cache(); it cannot "
                     f"decode with a KV cache")


def prompt_positions(padding_mask_BL):
  """<int32>[B, L]: 0, 1, ... over each row's real tokens (0 on padding)."""
  mask = padding_mask_BL.astype(jnp.int32)
  return jnp.maximum(jnp.cumsum(mask, axis=1) - 1, 0).astype(jnp.int32)


# The model is split once per generate call into (graphdef, state) and the
# steps are plain jax.jit functions of the state: no NNX graph traversal per
# token. The jitted pair is kept per model (weakly) while its structure is
# unchanged, so a second generate call on it compiles nothing new.
_STEPS = weakref.WeakKeyDictionary()
_SAMPLING = ("temperature", "top_k", "top_p")


def _steps(model):
  """(prefill, step, state) for `model`."""
  graphdef, state = nnx.split(model)
  entry = _STEPS.get(model)
  if entry is not None and entry[0] == graphdef:
    return entry[1], entry[2], state

  @functools.partial(jax.jit, static_argnames=_SAMPLING)
  def prefill(state, prompt_BL, positions_BL, mask_BL, cache, key, *,
              temperature, top_k, top_p):
    logits_BLV, _, cache = nnx.merge(graphdef, state)(
        prompt_BL, positions_BL=positions_BL, padding_mask_BL=mask_BL,
        cache=cache)
    return sampling.next_token(logits_BLV[:, -1], key,
                               temperature=temperature, top_k=top_k,
                               top_p=top_p), cache

  @functools.partial(jax.jit, static_argnames=_SAMPLING,
                     donate_argnames=("cache",))
  def step(state, token_B, position_B, cache, key, *, temperature, top_k,
           top_p):
    logits_BLV, _, cache = nnx.merge(graphdef, state)(
        token_B[:, None], positions_BL=position_B[:, None],
        padding_mask_BL=None, cache=cache)
    return sampling.next_token(logits_BLV[:, -1], key,
                               temperature=temperature, top_k=top_k,
                               top_p=top_p), cache

  _STEPS[model] = (graphdef, prefill, step)
  return prefill, step, state


def generate(model, prompt_BL, *, max_new_tokens, temperature=0.0,
             top_k=None, top_p=None, rng=None, padding_mask_BL=None,
             stop_tokens=(), on_token=None):
  """Continues each prompt by `max_new_tokens` tokens.

  Args:
    model: a model with init_cache and a cache-taking call (module doc).
    prompt_BL: <int32>[B, L] prompt ids, left-padded.
    max_new_tokens: N >= 1.
    temperature: 0 = greedy (argmax); > 0 samples from softmax(logits / T).
    top_k, top_p: filters applied before sampling (sampling.filter_logits).
    rng: a jax PRNG key or int seed (sampling only; default 0): the same rng
      gives the same tokens.
    padding_mask_BL: optional <bool>[B, L], False on the left padding.
    stop_tokens: ids that end a row; after one, the row repeats it.
    on_token: optional callback(step, tokens_B numpy) after each new token
      (the generate app prints as it goes).
  Returns:
    <int32>[B, L + N]: the prompts, then the new tokens.
  """
  if isinstance(max_new_tokens, bool) or not isinstance(
      max_new_tokens, int) or max_new_tokens < 1:
    raise ValueError(f"max_new_tokens must be an integer >= 1, got "
                     f"{max_new_tokens!r}")
  prompt_BL = jnp.asarray(prompt_BL)
  if prompt_BL.ndim != 2 or not jnp.issubdtype(prompt_BL.dtype, jnp.integer):
    raise ValueError(f"prompt_BL must be an integer array [B, L], got "
                     f"{prompt_BL.dtype}{tuple(prompt_BL.shape)}")
  vocab = getattr(model, "vocab_size", None) or getattr(
      getattr(model, "spec", None), "vocab_size", None)
  sampling.check_sampling(temperature, top_k, top_p, vocab or 2 ** 31 - 1)
  check_decodable(model)
  b, l = prompt_BL.shape
  mask_BL = (jnp.ones((b, l), bool) if padding_mask_BL is None
             else jnp.asarray(padding_mask_BL).astype(bool))
  if mask_BL.shape != (b, l):
    raise ValueError(f"padding_mask_BL must have shape {(b, l)}, got "
                     f"{tuple(mask_BL.shape)}")
  if not bool(mask_BL[:, -1].all()):
    raise ValueError("prompts must be left-padded: every row's last token "
                     "must be real (padding_mask_BL[:, -1] all True)")
  key = (jax.random.key(0) if rng is None else
         jax.random.key(rng) if isinstance(rng, int) else rng)
  stops = jnp.asarray(list(stop_tokens) or [-1], jnp.int32)
  sample = dict(temperature=float(temperature), top_k=top_k, top_p=top_p)

  cache = model.init_cache(b, l + max_new_tokens)
  positions_BL = prompt_positions(mask_BL)
  key, sub = jax.random.split(key)
  prefill, decode_step, state = _steps(model)
  token_B, cache = prefill(state, prompt_BL.astype(jnp.int32), positions_BL,
                           mask_BL, cache, sub, **sample)
  position_B = positions_BL[:, -1] + 1
  done_B = jnp.isin(token_B, stops)
  out = [np.asarray(token_B)]
  if on_token is not None:
    on_token(0, out[-1])
  for step in range(1, max_new_tokens):
    if bool(done_B.all()):
      out.append(out[-1])
      continue
    key, sub = jax.random.split(key)
    new_B, cache = decode_step(state, token_B, position_B, cache, sub,
                               **sample)
    # A stopped row repeats its stop token.
    token_B = jnp.where(done_B, token_B, new_B)
    done_B = done_B | jnp.isin(token_B, stops)
    position_B = position_B + 1
    out.append(np.asarray(token_B))
    if on_token is not None:
      on_token(step, out[-1])
  return jnp.concatenate([prompt_BL.astype(jnp.int32),
                          jnp.asarray(np.stack(out, axis=1))], axis=1)
