r"""Generate text from a pretrained checkpoint or a moejax training workdir.

  python -m experiments.generate --checkpoint=tests/models/fixtures/olmoe \
      --prompt="def main():" --max_new_tokens=32

Prints the prompt, then each new token as it is produced (one jitted decode
step per token, from a KV cache). --temperature=0 (the default) is greedy;
otherwise --top_k / --top_p filter and --seed makes the draw reproducible.
"""

import sys
import time

from absl import app
from absl import flags
from absl import logging
import numpy as np

_CHECKPOINT = flags.DEFINE_string(
    "checkpoint", None, "A pretrained checkpoint directory (config.json + "
    "safetensors + tokenizer.json) or a moejax training workdir.",
    required=True)
_PROMPT = flags.DEFINE_string("prompt", None, "The prompt text.",
                              required=True)
_NEW = flags.DEFINE_integer("max_new_tokens", 32, "Tokens to generate.",
                            lower_bound=1)
_TEMPERATURE = flags.DEFINE_float("temperature", 0.0, "0 = greedy.",
                                  lower_bound=0.0)
_TOP_K = flags.DEFINE_integer("top_k", None, "Keep the k most likely tokens.")
_TOP_P = flags.DEFINE_float("top_p", None, "Nucleus: keep the most likely "
                            "tokens up to this mass.")
_SEED = flags.DEFINE_integer("seed", 0, "Sampling seed.")
_STEP = flags.DEFINE_integer("step", None, "Workdir step (default: latest).")


class _Printer:
  """Prints the text decoded so far, one new piece per token."""

  def __init__(self, tokenizer, stream):
    self.tokenizer, self.stream = tokenizer, stream
    self.ids, self.shown = [], ""

  def __call__(self, step, tokens_B):
    del step
    self.ids.append(int(tokens_B[0]))
    text = self.tokenizer.decode(self.ids)
    # Decoding grows by whole pieces; print only what is new.
    if text.startswith(self.shown):
      self.stream.write(text[len(self.shown):])
    else:
      self.stream.write(text)
    self.shown = text
    self.stream.flush()


def main(argv):
  del argv
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)  # no backend-probing chatter
  # pylint: disable=g-import-not-at-top
  from moejax import inference
  from moejax.inference import checkpoints
  try:
    model, tokenizer = checkpoints.load_checkpoint(_CHECKPOINT.value,
                                                   step=_STEP.value)
  except (FileNotFoundError, ValueError) as e:
    sys.exit(f"error: {e}")
  prompt = tokenizer.encode(_PROMPT.value)
  if not len(prompt):
    raise app.UsageError("--prompt encodes to no tokens")
  sys.stdout.write(_PROMPT.value)
  sys.stdout.flush()
  start = time.perf_counter()
  out = inference.generate(
      model, np.asarray(prompt, np.int32)[None], max_new_tokens=_NEW.value,
      temperature=_TEMPERATURE.value, top_k=_TOP_K.value, top_p=_TOP_P.value,
      rng=_SEED.value, on_token=_Printer(tokenizer, sys.stdout))
  seconds = time.perf_counter() - start
  new = out.shape[1] - len(prompt)
  sys.stdout.write(f"\n[{new} tokens in {seconds:.2f} s, compile included]\n")


if __name__ == "__main__":
  app.run(main)
