"""Starting a run from existing weights: fine-tuning, continued pretraining,
upcycling; and which parameters train.

config.init_from (read only on a fresh start; a resume restores its own
checkpoint):
  path: a pretrained checkpoint directory (safetensors) or a moejax training
    workdir (its latest checkpoint), '' for none;
  mode: 'copy' (every variable of the model comes from the source, which
    must have the same structure) or 'upcycle' (a dense source fills an MoE
    model: dense FFNs become copies in every expert, routers start fresh;
    moejax.models.upcycle_params);
  drop_ratio: Drop-Upcycling's re-initialised fraction (mode 'upcycle').
A model built with wrappers (config.model.wrappers, e.g. 'lora_experts')
is filled through moejax.layers.build.unwrapped: the checkpoint's weights
go to the wrapped (frozen) modules by the checkpoint's own paths, and the
wrappers' adapters and routers keep their initialisation (LoRA's B = 0: at
step 0 the model computes the checkpoint's function).

config.trainable: which parameters train; the others become FrozenParams
(moejax.layers.params), so they get no gradient and no optimizer state:
  'all'; 'router' (the routers only); 'non_experts' (everything but the
  routed experts: frozen experts).
"""

from flax import nnx
import jax

from moejax.layers import build as build_lib
from moejax.layers import params as params_lib
from moejax.models import upcycling

MODES = ("copy", "upcycle")


def _is_router(path, variable):
  del variable
  return "router" in (str(p) for p in path)


def _is_expert(path, variable):
  del variable
  return "experts" in (str(p) for p in path)


# trainable -> which Params to freeze (None: none).
TRAINABLE = {
    "all": None,
    "router": lambda path, v: not _is_router(path, v),
    "non_experts": _is_expert,
}


def apply_trainable(model, trainable):
  """Freezes what `trainable` leaves out (in place); returns the count."""
  if trainable not in TRAINABLE:
    raise ValueError(f"trainable={trainable!r}; allowed: {list(TRAINABLE)}")
  select = TRAINABLE[trainable]
  return 0 if select is None else params_lib.freeze(model, select)


def source_model(path):
  """The model whose weights a run starts from: a pretrained directory or a
  training workdir (its latest step)."""
  # pylint: disable=g-import-not-at-top
  from moejax.inference import checkpoints
  from moejax.models import from_pretrained
  from moejax.train import export
  if checkpoints.is_pretrained(path):
    return from_pretrained(path)
  return export.load_model(path)


# Every variable but RNG state (keys and counts are the run's own).
_WEIGHTS = nnx.Not(nnx.RngState)


def fill_state(graphdef, state, init_from):
  """The TrainState with its model variables taken from init_from.path.

  Args:
    graphdef, state: the trainer's (state.params, state.model_state).
    init_from: the config section (path, mode, drop_ratio).
  Returns:
    (new TrainState, report dict: 'copied', 'broadcast', 'initialised'
    variable paths). Every array keeps its sharding.
  Raises:
    ValueError: mode 'copy' and the source lacks a variable of the model,
      or shapes differ (the path is named).
  """
  mode = init_from.get("mode", "copy")
  if mode not in MODES:
    raise ValueError(f"init_from.mode={mode!r}; allowed: {list(MODES)}")
  model = nnx.merge(graphdef, state.params, state.model_state)
  source = source_model(init_from["path"])
  # A model with wrappers (model.wrappers, e.g. LoRA experts over a
  # pretrained checkpoint) is filled by the source's own paths: its wrapped
  # modules stand in their bases' places meanwhile, and the wrappers' own
  # variables (adapters, routers) keep their initialisation.
  with build_lib.unwrapped(model):
    report = upcycling.upcycle_params(
        model, source, drop_ratio=float(init_from.get("drop_ratio", 0.0)
                                        or 0.0)
        if mode == "upcycle" else 0.0, variables=_WEIGHTS)
  if mode == "copy":
    fresh = report["initialised"] + report["broadcast"]
    if fresh:
      raise ValueError(
          f"init_from.mode='copy': {init_from['path']} has no {fresh[0]}"
          + (f" (and {len(fresh) - 1} more)" if len(fresh) > 1 else "")
          + "; the model must have the checkpoint's structure (use "
          "mode='upcycle' to start an MoE model from a dense one)")
  _, params, model_state = nnx.split(model, nnx.Param, ...)
  new = state.replace(params=params.to_pure_dict(),
                      model_state=model_state.to_pure_dict())
  # Back onto the shardings the trainer laid out.
  new = jax.tree.map(lambda x, old: jax.device_put(x, old.sharding), new,
                     state)
  return new, report
