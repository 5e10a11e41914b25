r"""Fine-tune (or continue pretraining) a pretrained MoE checkpoint.

  python -m experiments.train --config=experiments/configs/finetune.py \
      --config.init_from.path=tests/models/fixtures/olmoe \
      --workdir=workdirs/finetune_olmoe

The model is the checkpoint's own architecture (config.model.name
'pretrained', built from its config.json) filled with its weights
(config.init_from, mode 'copy'); the data is the embedded stdlib corpus
tokenized with the checkpoint's tokenizer.json. It resumes, saves and
guards against NaNs and preemption like every run.

get_config(arg): comma-separated:
  trainable: all (default: full fine-tuning) | router (router only) |
             non_experts (frozen experts)
  adapters:  none (default) | lora: LoRA experts (MoLoRA / LoRAMoE,
             moejax/layers/lora_experts.py) over every block's frozen FFN,
             dense or MoE (config.model.wrappers.lora_experts); only the
             adapters and their routers train, the checkpoint's weights
             stay bitwise, and step 0 computes the checkpoint (B = 0):

  python -m experiments.train --config=experiments/configs/finetune.py:lora \
      --config.init_from.path=tests/models/fixtures/olmoe \
      --workdir=workdirs/lora_olmoe

  size:      small (default) | smoke (seconds; tests)
The path defaults to the OLMoE fixture; pass another with
--config.init_from.path (model.path follows it unless set).
"""

import ml_collections
from ml_collections import config_dict

from moejax.train import config as config_lib

FIXTURE = "tests/models/fixtures/olmoe"
# LoRA experts wrap every block's FFN: the dense ones and whole MoE layers
# (their shared experts are inside them).
LORA_SELECT = "moejax.layers.ffn.DenseFFN,moejax.layers.moe.MoELayer"
SIZES = {  # seq, batch, steps
    "small": (128, 16, 200),
    "smoke": (32, 8, 4),
}


def get_config(arg=None):
  opts = config_lib.parse_arg(arg, trainable=("all", "router", "non_experts"),
                              adapters=("none", "lora"),
                              size=("small", "smoke"))
  seq_len, batch, steps = SIZES[opts["size"]]
  c = config_lib.base_config()
  c.task = "lm"
  c.num_train_steps = steps
  c.batch_size = batch
  c.eval_every = max(steps // 4, 1)
  c.eval_steps = 8
  c.checkpoint_every = max(steps // 4, 1)
  c.optimizer.learning_rate = 1e-3
  c.optimizer.warmup_steps = max(steps // 10, 1)
  c.optimizer.weight_decay = 0.0
  c.mesh.data, c.mesh.expert = -1, 1
  c.init_from.path = FIXTURE
  c.init_from.mode = "copy"
  c.trainable = opts["trainable"]
  # The architecture of the checkpoint (config.json); None: init_from.path.
  c.model = ml_collections.ConfigDict(dict(
      name="pretrained", path=config_dict.placeholder(str),
      dtype="float32", param_dtype="float32"))
  if opts["adapters"] == "lora":
    # Applied after the architecture is built and frozen; init_from then
    # copies the checkpoint into the wrapped FFNs (moejax.train.init_from).
    c.model.wrappers = ml_collections.ConfigDict(dict(lora_experts=dict(
        num_experts=4, rank=8, alpha=16.0,
        k=config_dict.placeholder(int),  # None: MoLoRA's soft mix of all
        select=LORA_SELECT)))
  c.data = ml_collections.ConfigDict(dict(
      dataset="stdlib_bytes", seq_len=seq_len, train_split="train",
      eval_split="validation", shuffle_buffer_size=256,
      # The checkpoint's tokenizer.json; None: init_from.path.
      tokenizer=config_dict.placeholder(str),
      data_dir=config_dict.placeholder(str),
      # dataset='text_files': a directory of your .txt/.md/.rst/.py files.
      source_dir=config_dict.placeholder(str),
      max_files=config_dict.placeholder(int),
      validation_fraction=config_dict.placeholder(float)))
  c.aux_loss_weights.load_balance = 1e-2
  # The pretrained routers' own losses are off; a DeepSeek checkpoint's
  # sequence_balance may be switched on with --config.aux_loss_weights.
  if opts["size"] == "smoke":
    c.data.max_files = 8
    c.data.shuffle_buffer_size = 16
    c.eval_steps = 2
  return c
