"""Tasks (LM, classification), the loss, and the jitted train and eval steps.

The loss of one batch is

    loss = task loss (masked mean cross-entropy)
           + sum over MoE layers of sum_name weights[name] * aux.losses[name]

with the weights a {name: float} dict over loss names (load_balance,
z_loss, and the routers' own, e.g. importance, load, sequence_balance;
moejax.layers.build.known_loss_names). aux.losses holds
only the names the model's layers report; a non-zero weight on any other
name raises, a zero weight is ignored (moejax.layers.weighted_sum).

The forward pass changes no router state. After the gradient, the train
step applies the updates routers ask for from the forward's stats
(moejax.layers.update_routers: DeepSeek's selection bias); the eval step
changes no state.
"""

import dataclasses

from flax import nnx
import jax
import jax.numpy as jnp
import optax

from moejax.layers import moe as moe_lib
from moejax.layers import transformer as tfm


def masked_cross_entropy(logits_XV, labels_X, mask_X=None):
  """Mean over unmasked positions of -log softmax(logits)[label].

  Args:
    logits_XV: <float32>[..., V].
    labels_X: <int>[...] in [0, V).
    mask_X: optional <bool or float>[...] weights (0 = ignored).
  Returns:
    (mean loss <float32>[], mean accuracy <float32>[], weight sum <float32>[]).
  """
  logits_XV = logits_XV.astype(jnp.float32)
  ce_X = optax.softmax_cross_entropy_with_integer_labels(logits_XV, labels_X)
  correct_X = (jnp.argmax(logits_XV, -1) == labels_X).astype(jnp.float32)
  w_X = (jnp.ones_like(ce_X) if mask_X is None else
         mask_X.astype(jnp.float32))
  denom = jnp.maximum(jnp.sum(w_X), 1e-9)
  return (jnp.sum(ce_X * w_X) / denom, jnp.sum(correct_X * w_X) / denom,
          jnp.sum(w_X))


@dataclasses.dataclass(frozen=True)
class LMTask:
  """Next-token prediction on {'inputs', 'targets'} <int32>[B, L] (and an
  optional 'mask' [B, L]: 0 = not in the loss)."""
  name: str = "lm"

  def forward(self, model, batch, deterministic):
    return model(batch["inputs"], deterministic=deterministic)

  def loss(self, logits, batch):
    ce, acc, weight = masked_cross_entropy(logits, batch["targets"],
                                           batch.get("mask"))
    return ce, {"accuracy": acc, "weight": weight}

  def tokens(self, batch):
    return int(batch["inputs"].shape[0] * batch["inputs"].shape[1])

  def weight(self, batch):
    """<float32>[] the positions the loss averages over (masked_cross_entropy's
    weight sum)."""
    return _weight(batch["targets"], batch.get("mask"))


@dataclasses.dataclass(frozen=True)
class ClassificationTask:
  """Image classification on {'image' [B, H, W, C], 'label' <int32>[B]}.
  tokens_per_example: the model's tokens per image (for tokens/s)."""
  tokens_per_example: int = 1
  name: str = "classification"

  def forward(self, model, batch, deterministic):
    return model(batch["image"], deterministic=deterministic)

  def loss(self, logits, batch):
    ce, acc, weight = masked_cross_entropy(logits, batch["label"],
                                           batch.get("mask"))
    return ce, {"accuracy": acc, "weight": weight}

  def tokens(self, batch):
    return int(batch["image"].shape[0] * self.tokens_per_example)

  def weight(self, batch):
    """<float32>[] the examples the loss averages over."""
    return _weight(batch["label"], batch.get("mask"))


def _weight(labels_X, mask_X):
  if mask_X is None:
    return jnp.asarray(labels_X.size, jnp.float32)
  return jnp.sum(mask_X.astype(jnp.float32))


def check_aux_loss_weights(aux_loss_weights):
  """{name: weight} as a dict of numbers; raises ValueError for a weight
  that is not a number. Names are checked where the model is known: a
  non-zero weight on a loss no layer reports raises when the step is
  traced (moejax.layers.weighted_sum), and validate_config refuses names
  no layer of the model can report, even with weight 0."""
  weights = dict(aux_loss_weights or {})
  for name, w in weights.items():
    if isinstance(w, bool) or not isinstance(w, (int, float)):
      raise ValueError(f"aux loss weight {name}={w!r} is not a number")
  return weights


def aux_loss(aux, aux_loss_weights):
  """sum over MoE layers of sum_name weights[name] * aux.losses[name]
  (<float32>[], moejax.layers.total_aux_loss); 0 for a model without MoE
  layers (aux None), whatever the weights. A non-zero weight on a loss no
  layer reports raises ValueError when traced."""
  if aux is None:
    return jnp.zeros((), jnp.float32)
  return tfm.total_aux_loss(aux, aux_loss_weights)


def compute_loss(task, model, batch, aux_loss_weights, deterministic):
  """(loss, (task metrics, stacked MoEAux or None, task loss, weighted aux))."""
  logits, aux = task.forward(model, batch, deterministic)
  task_loss, task_metrics = task.loss(logits, batch)
  weighted = aux_loss(aux, aux_loss_weights)
  return task_loss + weighted, (task_metrics, aux, task_loss, weighted)


def _aux_metrics(aux):
  """Per-layer routing metrics, and each reported aux loss (unweighted,
  summed over layers) as aux/<name>."""
  if aux is None:
    return {}
  out = {f"aux/{name}": jnp.sum(value) for name, value in aux.losses.items()}
  m = aux.metrics
  out.update({
      "moe/expert_load": m.expert_load_E,               # [layers, E]
      "moe/dropped_fraction": m.dropped_fraction,       # [layers]
      "moe/router_entropy": m.router_entropy,           # [layers]
      "moe/max_over_mean_load": m.max_over_mean_load,   # [layers]
      "moe/mean_k": m.mean_k,                           # [layers]
  })
  return out


def split_micro_batches(batch, micro_batches):
  """A global batch as `micro_batches` micro-batches: every leaf [B, ...]
  becomes [K, B / K, ...], micro-batch k holding rows k, k + K, k + 2K, ...
  (so each device keeps its rows when B / devices is a multiple of K).
  Raises ValueError when K does not divide B."""
  def split(x):
    b = x.shape[0]
    if b % micro_batches:
      raise ValueError(f"micro_batches={micro_batches} must divide the batch "
                       f"size {b}")
    return jnp.swapaxes(
        x.reshape((b // micro_batches, micro_batches) + x.shape[1:]), 0, 1)
  return jax.tree.map(split, batch)


def make_train_step(graphdef, task, tx, schedule, aux_loss_weights, *,
                    state_shardings=None, donate=True, skip_nonfinite=False,
                    inject_nan_steps=(), micro_batches=1):
  """The jitted train step: (TrainState, batch) -> (TrainState, metrics).

  Args:
    graphdef: the model's nnx.GraphDef (static).
    task: LMTask or ClassificationTask.
    tx: optax.GradientTransformation (make_optimizer).
    schedule: step -> learning rate (for the metric only).
    aux_loss_weights: {loss name: weight}; a non-zero weight on a loss
      the model's layers do not report raises when the step is traced
      (moejax.train.validate_config catches it first, and typos too).
    state_shardings: the TrainState's shardings, pinned as out_shardings so
      parameters keep their layout step after step; None lets XLA choose.
    donate: donate the input state's buffers (the caller must not reuse it).
    skip_nonfinite: when the loss or the gradient norm is NaN/Inf, keep the
      params, model state and optimizer state of the input (the step
      counter still advances) and report metrics['skipped'] = 1.
    inject_nan_steps: fault injection for tests: the loss of these steps
      (the step number after the update, 1-based) is multiplied by NaN, so
      the loss and every gradient are NaN.
    micro_batches: K > 1 accumulates the gradient over K micro-batches of
      B / K examples (split_micro_batches; jax.lax.scan, so activations of
      one micro-batch at a time) before one optimizer update. The task loss
      of micro-batch k is weighted by its share of the batch's scored
      positions and the aux losses by 1 / K, so the gradient equals the
      full batch's (float32 rounding aside) whenever the aux losses are
      means over groups or tokens (load_balance, z_loss,
      sequence_balance); batch-level ones (importance, load) are computed
      per micro-batch. MoE metrics are means over micro-batches.

  After the gradient, the routers' state updates (DeepSeek's bias) are
  applied from the forward pass's stats (moejax.layers.update_routers), so
  the returned model_state holds them; a skipped step keeps the old one.

  Returns:
    A jitted function. metrics: loss, ce_loss (task loss), aux_loss
    (weighted), aux/<name> for each loss the layers report (unweighted,
    summed over layers), accuracy,
    grad_norm (before clipping), param_norm, learning_rate, and for MoE
    models moe/expert_load [layers, E], moe/dropped_fraction,
    moe/router_entropy, moe/max_over_mean_load [layers]; with
    skip_nonfinite, skipped (1.0 when the update was skipped).
  """
  weights = check_aux_loss_weights(aux_loss_weights)
  nan_steps = tuple(int(s) for s in inject_nan_steps)
  micro_batches = int(micro_batches)
  if micro_batches < 1:
    raise ValueError(f"micro_batches={micro_batches}; allowed: an integer "
                     f">= 1")

  def grad_of(state, params, model_state, batch, task_scale, aux_scale):
    """Gradient of task_scale * task loss + aux_scale * weighted aux."""
    def loss_fn(params):
      model = nnx.merge(graphdef, params, model_state)
      _, (task_metrics, aux, task_loss, weighted) = compute_loss(
          task, model, batch, weights, deterministic=False)
      objective = task_scale * task_loss + aux_scale * weighted
      if nan_steps:
        hit = jnp.isin(state.step + 1, jnp.asarray(nan_steps, jnp.int32))
        objective = objective * jnp.where(hit, jnp.nan, 1.0).astype(
            objective.dtype)
      new_model_state = nnx.state(model, nnx.Not(nnx.Param)).to_pure_dict()
      return objective, (task_metrics, aux, task_loss, weighted,
                         new_model_state)
    return jax.value_and_grad(loss_fn, has_aux=True)(params)

  def full_batch(state, batch):
    (loss, (task_metrics, aux, task_loss, weighted, model_state)), grads = (
        grad_of(state, state.params, state.model_state, batch, 1.0, 1.0))
    return (loss, task_loss, task_metrics["accuracy"], weighted, aux,
            model_state, grads)

  def accumulated(state, batch):
    total_weight = jnp.maximum(task.weight(batch), 1e-9)

    def micro(carry, micro_batch):
      grads_acc, model_state = carry
      share = task.weight(micro_batch) / total_weight
      (objective, (task_metrics, aux, task_loss, weighted, model_state)), (
          grads) = grad_of(state, state.params, model_state, micro_batch,
                           share, 1.0 / micro_batches)
      grads_acc = jax.tree.map(jnp.add, grads_acc, grads)
      out = dict(loss=objective, ce=share * task_loss,
                 accuracy=share * task_metrics["accuracy"],
                 weighted=weighted / micro_batches, aux=aux)
      return (grads_acc, model_state), out

    zeros = jax.tree.map(jnp.zeros_like, state.params)
    (grads, model_state), out = jax.lax.scan(
        micro, (zeros, state.model_state),
        split_micro_batches(batch, micro_batches))
    aux = jax.tree.map(lambda x: jnp.mean(x, axis=0), out["aux"])
    return (jnp.sum(out["loss"]), jnp.sum(out["ce"]),
            jnp.sum(out["accuracy"]), jnp.sum(out["weighted"]), aux,
            model_state, grads)

  def train_step(state, batch):
    run = full_batch if micro_batches == 1 else accumulated
    loss, task_loss, accuracy, weighted, aux, model_state, grads = run(
        state, batch)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    if aux is not None:
      # Router state updates from the forward's stats (DeepSeek's bias).
      model = nnx.merge(graphdef, params, model_state)
      moe_lib.update_routers(model, aux)
      model_state = nnx.state(model, nnx.Not(nnx.Param)).to_pure_dict()
    metrics = {
        "loss": loss, "ce_loss": task_loss, "aux_loss": weighted,
        "accuracy": accuracy,
        "grad_norm": optax.global_norm(grads),
        "param_norm": optax.global_norm(params),
        "learning_rate": jnp.asarray(schedule(state.step), jnp.float32),
    }
    metrics.update(_aux_metrics(aux))
    new_state = state.replace(step=state.step + 1, params=params,
                              model_state=model_state, opt_state=opt_state)
    if skip_nonfinite:
      finite = jnp.isfinite(loss) & jnp.isfinite(metrics["grad_norm"])
      kept = state.replace(step=state.step + 1)
      new_state = jax.lax.cond(finite, lambda: new_state, lambda: kept)
      metrics["skipped"] = 1.0 - finite.astype(jnp.float32)
    return new_state, metrics

  return jax.jit(train_step, donate_argnums=(0,) if donate else (),
                 out_shardings=(state_shardings, None))


def make_eval_step(graphdef, task, aux_loss_weights):
  """The jitted eval step: (TrainState, batch) -> metrics of the batch.

  Runs the model with deterministic=True (eval capacity factor, no noise)
  and applies no router update: the state is not changed. Metrics: loss,
  ce_loss, aux_loss, accuracy, weight (the number of scored positions, for
  averaging) and the MoE metrics of make_train_step.
  """
  weights = check_aux_loss_weights(aux_loss_weights)

  def eval_step(state, batch):
    model = nnx.merge(graphdef, state.params, state.model_state)
    loss, (task_metrics, aux, task_loss, weighted) = compute_loss(
        task, model, batch, weights, deterministic=True)
    metrics = {"loss": loss, "ce_loss": task_loss, "aux_loss": weighted,
               **task_metrics}
    metrics.update(_aux_metrics(aux))
    return metrics

  return jax.jit(eval_step)


def evaluate(eval_step, state, batches):
  """Weighted means of eval_step's metrics over `batches` (an iterable of
  global batches); returns {} when there is none."""
  totals, total_w = {}, 0.0
  for batch in batches:
    m = jax.device_get(eval_step(state, batch))
    w = float(m.pop("weight"))
    for k, v in m.items():
      totals[k] = totals.get(k, 0.0) + w * v
    total_w += w
  if not total_w:
    return {}
  return {k: v / total_w for k, v in totals.items()}
