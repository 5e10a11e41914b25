r"""The router study: routers, capacity factors and expert counts at equal
active FLOPs and equal steps, sized for a 2-core CPU (docs/router_study.md).

The whole grid is one command (19 runs; 32 minutes on a 2-core machine
that other jobs were loading). docs/router_study.md has the results, the
seed repeats and the discussion:

  python -m experiments.sweep --config=experiments/configs/router_study.py \
      --sweep_dir=workdirs/router_study
  python -m experiments.report --sweep_dir=workdirs/router_study \
      --out_dir=docs/figures/router_study

get_config(arg): comma-separated; `router` picks the run (bare values work:
`top2`, `vit_soft`), `size` = study (default) | smoke (seconds; tests).

LM runs (decoder on the embedded stdlib byte corpus; 4 layers, M=64, MoE in
layers 1 and 3). Every MoE layer runs the FLOPs of one FFN of width F=128
per token, the width of every FFN of the dense baseline:
  dense     no MoE layers; mlp_dim F (the FLOP-matched dense model).
  top1      Switch: token choice k=1, experts of width F, raw probability.
  top2      GShard: token choice k=2, experts of width F/2, renormalised.
  hash      hash routing of the token id, k=1, width F.
  base      BASE layers (Sinkhorn-balanced top-1 at training time, greedy
            top-1 at eval), width F. Its training assignment reads the whole
            group (non-causal; allow_non_causal=True); the eval does not.
  deepseek  DeepSeek-V3 style: one shared expert of width F/2, top-2 of 16
            routed experts of width F/4 (sigmoid gates, renormalised),
            aux-loss-free bias balancing (no load-balance loss; a 1e-4
            sequence-wise loss), dropless.
  expert_choice  experts pick tokens (capacity factor 1 = one expert per
            token on average, width F). Non-causal in a decoder, so it needs
            allow_non_causal=True and its loss is not comparable: not in the
            grid; the ViT runs compare expert choice instead.
Capacity: token choice routers train at capacity_factor 1.25 unless swept;
the eval uses the same factor (eval_capacity_factor None), so drops count in
the validation loss. `moe.engine.name=dropless` drops nothing.

The survey's next families (issue 16; docs/router_study.md, second table),
each the top-2 run (8 experts of width F/2, capacity factor 1.25) with one
change, so every MoE layer stays near one width-F FFN per token:
  top2_global   balance loss over the global batch (moe.balance_scope).
  top_p         top-p routing, p = 0.4, at most 4 experts (dropless; its
                active FLOPs follow its mean k, reported).
  null_experts  AdaMoE: top-4 of 8 real + 8 null experts (dropless).
  evomoe        EvoMoE dense-to-sparse gate, annealed over the first third
                of training, then top-2 (dropless).
  stablemoe     StableMoE: top-1 of width F, routing frozen to a distilled
                token-id router at half of training.
  lory          Lory: merged experts of width F per 16-token segment, routed
                on the previous segment.
  smear         SMEAR with per-token merging (causal; runs all 8 experts'
                matmuls, so 8x the FFN FLOPs: not FLOP-matched).
  mod           top2 with Mixture-of-Depths on blocks 1 and 3 (half of the
                tokens; fewer FLOPs).
  moa, switchhead  top2 with MoA / SwitchHead attention in every block
                (experts computed densely: more attention FLOPs).
  lora          the dense model with routed LoRA experts over its frozen
                (random) FFNs: selectable, not a from-scratch comparison,
                not in the grid.
Sizes: `size=s500`, `s1000` are the study's model trained 500 / 1000 steps
on a better-mixed stream, evaluated on the whole validation split, with the
learning rate decayed to 0 (the second table's setting is s1000).

ViT runs (8x8 digits, 16 tokens per image = one routing group, E=8, MoE in
layers 1 and 3), each MoE layer 2 expert FFNs per token:
  vit_dense  no MoE (fewer FLOPs: one FFN per token).
  vit_top2   token choice k=2, capacity factor 1.0 (C = 4 slots).
  vit_bpr    the same with batch-prioritized routing (V-MoE BPR).
  vit_ec     expert choice, capacity factor 2.0 (C = 4: the same slots).
  vit_soft   Soft MoE with 4 slots per expert (32 slots = 2 per token).
"""

import importlib.util
import os

from moejax.train import config as config_lib

LM_ROUTERS = ("top1", "top2", "dense", "hash", "base", "deepseek",
              "expert_choice")
FAMILY_ROUTERS = ("top2_global", "top_p", "null_experts", "evomoe",
                  "stablemoe", "lory", "smear", "mod", "moa", "switchhead",
                  "lora")
VIT_ROUTERS = ("vit_top2", "vit_bpr", "vit_ec", "vit_soft", "vit_dense")

# LM: model width, layers, heads, F (dense FFN width = active FFN width of
# each MoE layer), experts, sequence length, batch, steps.
LM_SIZES = {
    #         M   layers heads F    E  seq  batch steps
    "study": (64, 4,     4,    128, 8, 128, 16,   250),
    "smoke": (32, 2,     2,    64,  4, 32,  8,    6),
    "s500":  (64, 4,     4,    128, 8, 128, 16,   500),
    "s1000": (64, 4,     4,    128, 8, 128, 16,   1000),
}
SECOND_TABLE_SIZES = ("s500", "s1000")
# ViT: model width, layers, heads, mlp, experts, batch, steps.
VIT_SIZES = {
    "study": (64, 4, 4, 128, 8, 64, 300),
    "smoke": (16, 2, 2, 32, 4, 16, 6),
}


def _sibling(name):
  """Loads experiments/configs/<name>.py (works without a package import)."""
  path = os.path.join(os.path.dirname(os.path.abspath(__file__)),
                      name + ".py")
  spec = importlib.util.spec_from_file_location(f"router_study_{name}", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def _lm_config(router, size):
  m, layers, heads, f, experts, seq_len, batch, steps = LM_SIZES[size]
  base = "dense" if router == "dense" else "moe"
  c = _sibling("lm_stdlib").get_config(
      f"{base},size={'smoke' if size == 'smoke' else 'small'},router=top1")
  c.num_train_steps = steps
  c.batch_size = batch
  c.data.seq_len = seq_len
  c.model.model_dim, c.model.num_layers, c.model.num_heads = m, layers, heads
  c.model.mlp_dim = f
  c.optimizer.warmup_steps = max(steps // 15, 1)
  c.baseline_workdir = ""
  # One device: on a 2-core CPU the 8 virtual devices of lm_stdlib only add
  # collectives.
  c.num_cpu_devices = 0
  c.mesh.data, c.mesh.expert = -1, 1
  c.expert_parallel = ""
  if size != "smoke":
    c.eval_every = steps // 2
    c.checkpoint_every = steps // 2
    c.eval_steps = 16
  if size in SECOND_TABLE_SIZES:
    # The second table's setting (docs/router_study.md, "Finding the
    # setting"): a 16384-window shuffle buffer (2.1M tokens, ~130 files'
    # worth) instead of 1024, so a batch mixes many files of the
    # domain-ordered corpus; the whole validation split (112 batches of
    # 16 x 129 tokens ~ its 233k tokens) instead of its first 16 batches (2
    # or 3 files); the learning rate decays to 0.
    c.data.shuffle_buffer_size = 16384
    c.eval_steps = 112
    c.optimizer.end_learning_rate_fraction = 0.0
  moe = c.moe
  moe.experts.num_experts = experts
  # None: the eval uses the training factor.
  moe.eval_capacity_factor = None
  moe.allow_non_causal = False
  moe.shared.num_experts = 0
  if router == "dense":
    return c
  if router in FAMILY_ROUTERS:
    return _family_config(c, router, f, experts, seq_len, steps)
  # Top-1 token choice (Switch), experts of width F, raw probability.
  moe.router.k, moe.router.renormalize = 1, False
  moe.experts.hidden_dim = f
  if router == "top2":
    moe.router.k, moe.router.renormalize = 2, True
    moe.experts.hidden_dim = f // 2
  elif router == "hash":
    _set_router(moe, name="hash", k=1)
  elif router == "base":
    _set_router(moe, name="balanced")
    moe.allow_non_causal = True          # training-time Sinkhorn only
  elif router == "expert_choice":
    _set_router(moe, name="expert_choice")
    moe.capacity_factor = 1.0
    moe.allow_non_causal = True
  elif router == "deepseek":
    # Short runs: a faster bias update than DeepSeek-V3's 1e-3.
    _set_router(moe, name="deepseek", k=2, gating="sigmoid",
                renormalize=True, bias_update_rate=1e-2)
    moe.engine.name = "dropless"
    moe.experts.num_experts = 2 * experts
    moe.experts.hidden_dim = f // 4
    moe.shared.num_experts, moe.shared.hidden_dim = 1, f // 2
    c.aux_loss_weights.load_balance = 0.0
    c.aux_loss_weights.z_loss = 0.0
    c.aux_loss_weights.sequence_balance = 1e-4
  return c


def _family_config(c, router, f, experts, seq_len, steps):
  """One of FAMILY_ROUTERS: the top2 run with one change (docstring)."""
  moe = c.moe
  moe.router.k, moe.router.renormalize = 2, True
  moe.experts.hidden_dim = f // 2
  dropless = lambda: setattr(moe.engine, "name", "dropless")
  if router == "top2_global":
    moe.balance_scope = "global"
  elif router == "top_p":
    _set_router(moe, name="top_p", p=0.4, k=4)
    dropless()
    c.aux_loss_weights.dynamic_entropy = 1e-4      # the paper's weight
  elif router == "null_experts":
    _set_router(moe, name="null_experts", num_null=experts, k=4)
    dropless()
    # AdaMoE balances real and null experts together.
    c.aux_loss_weights.load_balance = 0.0
    c.aux_loss_weights.null_balance = 0.01
  elif router == "evomoe":
    _set_router(moe, name="dense_to_sparse", k=2,
                anneal_steps=max(steps // 3, 1), start_temperature=2.0,
                end_temperature=0.3, threshold=0.1)
    dropless()
  elif router == "stablemoe":
    _set_router(moe, name="stable_moe", vocab_size=c.model.vocab_size,
                stage1_steps=max(steps // 2, 1), distill_dim=16)
    moe.experts.hidden_dim = f
    c.aux_loss_weights.stable_distill = 1.0
  elif router in ("lory", "smear"):
    _clear(moe.router)
    _clear(moe.engine)
    _clear(moe.shared)
    _clear(moe.residual)
    for key in ("capacity_factor", "eval_capacity_factor", "allow_non_causal",
                "group_size"):
      moe[key] = None
    moe.layer = router
    moe.experts.hidden_dim = f
    if router == "lory":
      moe.segment_len = 16
    else:
      moe.granularity = "token"
  elif router == "mod":
    c.model.wrappers = {"mod": {"every": 2, "capacity_fraction": 0.5}}
    c.aux_loss_weights.mod_predictor = 0.1
  elif router in ("moa", "switchhead"):
    c.model.wrappers = {router: {"num_experts": 4, "k": 2}}
  elif router == "lora":
    c.model.moe_every = 0
    c.model.wrappers = {"lora_experts": {"num_experts": 4, "rank": 8,
                                         "k": 2}}
  del seq_len
  return c


def _clear(part):
  for key in part:
    part[key] = None


def _set_router(moe, **options):
  """Sets moe.router to exactly `options` (every other option unset)."""
  for key in moe.router:
    moe.router[key] = None
  for key, value in options.items():
    moe.router[key] = value


def _vit_config(router, size):
  m, layers, heads, mlp, experts, batch, steps = VIT_SIZES[size]
  variant = {"vit_dense": "dense", "vit_soft": "soft_moe"}.get(router, "moe")
  c = _sibling("vit_digits").get_config(
      f"{variant},size={'smoke' if size == 'smoke' else 'small'}")
  c.num_train_steps = steps
  c.batch_size = batch
  c.model.model_dim, c.model.num_layers, c.model.num_heads = m, layers, heads
  c.model.mlp_dim = mlp
  c.num_cpu_devices = 0                  # one device (see _lm_config)
  c.optimizer.warmup_steps = max(steps // 10, 1)
  if size == "study":
    c.eval_every = steps // 3
    c.checkpoint_every = steps // 2
  c.moe.experts.num_experts = experts
  if router == "vit_soft":
    c.moe.slots_per_expert = 4
  elif router != "vit_dense":
    c.moe.eval_capacity_factor = None
    c.moe.router.batch_prioritized = router == "vit_bpr"
    c.moe.capacity_factor = 1.0
    if router == "vit_ec":
      _set_router(c.moe, name="expert_choice")
      c.moe.capacity_factor = 2.0
  return c


def get_config(arg=None):
  """The config of one study run: arg 'router=<name>[,size=smoke]' (see
  the module docstring for the routers)."""
  opts = config_lib.parse_arg(arg, router=LM_ROUTERS + FAMILY_ROUTERS
                              + VIT_ROUTERS,
                              size=("study", "smoke", "s500", "s1000"))
  if opts["router"] in VIT_ROUTERS:
    if opts["size"] not in VIT_SIZES:
      raise ValueError(f"size={opts['size']} is an LM size; the ViT runs "
                       f"have sizes {sorted(VIT_SIZES)}")
    return _vit_config(opts["router"], opts["size"])
  return _lm_config(opts["router"], opts["size"])


def sweep():
  """The study: 14 LM runs, then 5 ViT runs."""
  points = [{"config_arg": "dense"}]
  for router in ("top1", "top2"):
    for cf in (1.0, 1.25, 2.0):
      points.append({"config_arg": router, "moe.capacity_factor": cf})
    points.append({"config_arg": router, "moe.engine.name": "dropless"})
  for experts in (4, 16):               # 8 is top1 at capacity factor 1.25
    points.append({"config_arg": "top1",
                   "moe.experts.num_experts": experts})
  for router in ("hash", "base", "deepseek"):
    points.append({"config_arg": router})
  for router in VIT_ROUTERS:
    points.append({"config_arg": router})
  return points
