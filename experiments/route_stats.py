r"""How a model routes your text: per-layer load, entropy, drops, co-activation.

  python -m experiments.route_stats --checkpoint=tests/models/fixtures/olmoe \
      --text=README.md --out_dir=/tmp/route_stats --capacity_factor=1.25 \
      --max_new_tokens=16

--checkpoint is a pretrained directory (config.json + safetensors, read with
moejax.models.from_pretrained, tokenized with its tokenizer.json) or a
moejax training workdir (moejax.train.load_model, byte-level text).
The text is cut into --rows rows of --seq_len tokens. With
--max_new_tokens=N each row is a prompt, the model continues it greedily,
and the report compares routing on the prompt with routing on the
continuation.

Writes into --out_dir:
  route_stats.md    one row per MoE layer: experts, max/mean load, router
                    entropy (and its fraction of ln E), the fraction the
                    capacity factor would drop, and the prompt/continuation
                    shift (total variation between the two loads)
  load.png          expert load, layers x experts
  coactivation.png  P(expert j | expert i) per layer
  shift.png         continuation load minus prompt load (with N > 0)
  stats.json        every figure above as numbers
"""

import json
import math
import os
import sys

from absl import app
from absl import flags
import numpy as np

_CHECKPOINT = flags.DEFINE_string(
    "checkpoint", None, "A pretrained checkpoint directory or a moejax "
    "training workdir.", required=True)
_TEXT = flags.DEFINE_string("text", None, "A UTF-8 text file.",
                            required=True)
_OUT_DIR = flags.DEFINE_string("out_dir", None, "Where the report goes.",
                               required=True)
_SEQ_LEN = flags.DEFINE_integer("seq_len", 64, "Tokens per row.",
                                lower_bound=1)
_ROWS = flags.DEFINE_integer("rows", 8, "Rows (at most) cut from the text.",
                             lower_bound=1)
_CF = flags.DEFINE_float("capacity_factor", 1.0, "The capacity factor whose "
                         "drops are estimated.", lower_bound=1e-6)
_NEW = flags.DEFINE_integer("max_new_tokens", 0, "Greedy continuation "
                            "length per row (0: no continuation).",
                            lower_bound=0)
_DPI = flags.DEFINE_integer("dpi", 100, "PNG resolution.", lower_bound=20)


def rows_of(ids, seq_len, rows):
  """<int32>[R, seq_len]: consecutive windows of the token ids (R <= rows)."""
  count = min(rows, len(ids) // seq_len)
  if count < 1:
    raise ValueError(f"the text holds {len(ids)} tokens, fewer than "
                     f"--seq_len={seq_len}; use a longer text or a smaller "
                     f"--seq_len")
  return np.asarray(ids[:count * seq_len], np.int32).reshape(count, seq_len)


def compute(model, tokens_BL, *, capacity_factor, max_new_tokens):
  """[per-layer stats dict] (see route_stats.layer_stats) and the tokens."""
  from moejax.inference import route_stats as rs  # pylint: disable=g-import-not-at-top
  split_BL = None
  if max_new_tokens:
    from moejax import inference  # pylint: disable=g-import-not-at-top
    prompt_len = tokens_BL.shape[1]
    tokens_BL = np.asarray(inference.generate(
        model, tokens_BL, max_new_tokens=max_new_tokens))
    split_BL = np.arange(tokens_BL.shape[1])[None, :] >= prompt_len
    split_BL = np.broadcast_to(split_BL, tokens_BL.shape)
  mask_BL = np.ones(tokens_BL.shape, bool)
  _, traces = rs.trace_routing(model, tokens_BL)
  return [rs.layer_stats(t, mask_BL, capacity_factor=capacity_factor,
                         split_BL=split_BL) for t in traces], tokens_BL


def markdown(stats, capacity_factor):
  """The per-layer table (markdown)."""
  shift = "shift_tv" in stats[0]
  head = ("| MoE layer | E | max/mean load | entropy (nats) | entropy / ln E "
          f"| dropped at cf={capacity_factor:g} |" +
          (" prompt -> continuation TV |" if shift else ""))
  lines = [head, "|" + "---|" * (head.count("|") - 1)]
  for i, s in enumerate(stats):
    e = len(s["load_E"])
    row = (f"| {i} | {e} | {s['max_over_mean_load']:.2f} | "
           f"{s['entropy']:.3f} | {s['entropy'] / math.log(e):.2f} | "
           f"{s['drop_fraction']:.1%} |")
    if shift:
      row += f" {s['shift_tv']:.3f} |"
    lines.append(row)
  return "\n".join(lines) + "\n"


def _ticks(ax, num_x, num_y):
  """Integer ticks, thinned to at most 16 labels per axis."""
  ax.set_xticks(range(0, num_x, max(1, math.ceil(num_x / 16))))
  ax.set_yticks(range(0, num_y, max(1, math.ceil(num_y / 16))))


def plot(stats, out_dir, *, title, dpi):
  """Writes load.png, coactivation.png and (with a continuation) shift.png."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  plt.rcParams.update({"font.size": 11})
  load_YE = np.stack([s["load_E"] for s in stats])
  y, e = load_YE.shape
  paths = []

  def layers_by_experts(values_YE, name, title_text, label, **imshow):
    """One [layers, experts] heatmap, saved as <out_dir>/<name>."""
    fig, ax = plt.subplots(figsize=(max(5, 0.35 * e + 2.5),
                                    max(2.5, 0.4 * y + 1.5)))
    im = ax.imshow(values_YE, aspect="auto", **imshow)
    _ticks(ax, e, y)
    ax.set_xlabel("expert")
    ax.set_ylabel("MoE layer")
    ax.set_title(f"{title}: {title_text}")
    fig.colorbar(im, ax=ax, label=label)
    fig.tight_layout()
    paths.append(os.path.join(out_dir, name))
    fig.savefig(paths[-1], dpi=dpi)
    plt.close(fig)

  layers_by_experts(load_YE, "load.png",
                    f"expert load (uniform = {1 / e:.3f})",
                    "fraction of assignments", cmap="viridis", vmin=0)

  cols = min(y, 4)
  rows = math.ceil(y / cols)
  fig, axes = plt.subplots(rows, cols, figsize=(3.4 * cols + 1, 3.2 * rows),
                           squeeze=False)
  for i, ax in enumerate(axes.flat):
    if i >= y:
      ax.axis("off")
      continue
    # The diagonal (1 for every chosen expert) is left out (grey), so the
    # colours spread over the off-diagonal pairs.
    co_EE = np.array(stats[i]["coactivation_EE"], float)
    np.fill_diagonal(co_EE, np.nan)
    cmap = plt.get_cmap("magma").copy()
    cmap.set_bad("lightgrey")
    im = ax.imshow(co_EE, cmap=cmap, vmin=0, vmax=1)
    _ticks(ax, e, e)
    ax.set_title(f"layer {i}")
    ax.set_xlabel("expert j")
    ax.set_ylabel("expert i")
  fig.suptitle(f"{title}: P(expert j chosen | expert i chosen), "
               f"diagonal omitted")
  fig.colorbar(im, ax=axes.ravel().tolist(), shrink=0.8)
  paths.append(os.path.join(out_dir, "coactivation.png"))
  fig.savefig(paths[-1], dpi=dpi)
  plt.close(fig)

  if "shift_tv" in stats[0]:
    diff_YE = np.stack([s["continuation_load_E"] - s["prompt_load_E"]
                        for s in stats])
    bound = float(np.abs(diff_YE).max()) or 1.0
    layers_by_experts(diff_YE, "shift.png",
                      "load on continuation minus load on prompt",
                      "difference in load fraction", cmap="coolwarm",
                      vmin=-bound, vmax=bound)
  return paths


def main(argv):
  del argv
  from moejax.inference import checkpoints  # pylint: disable=g-import-not-at-top
  try:
    model, tokenizer = checkpoints.load_checkpoint(_CHECKPOINT.value)
  except (FileNotFoundError, ValueError) as e:
    sys.exit(f"error: {e}")
  with open(_TEXT.value, encoding="utf-8", errors="replace") as f:
    ids = tokenizer.encode(f.read())
  tokens_BL = rows_of(ids, _SEQ_LEN.value, _ROWS.value)
  stats, _ = compute(model, tokens_BL, capacity_factor=_CF.value,
                     max_new_tokens=_NEW.value)
  os.makedirs(_OUT_DIR.value, exist_ok=True)
  table = markdown(stats, _CF.value)
  with open(os.path.join(_OUT_DIR.value, "route_stats.md"), "w") as f:
    f.write(f"Routing of {_TEXT.value} ({tokens_BL.shape[0]} rows x "
            f"{tokens_BL.shape[1]} tokens) by {_CHECKPOINT.value}\n\n{table}")
  with open(os.path.join(_OUT_DIR.value, "stats.json"), "w") as f:
    json.dump([{k: np.asarray(v).tolist() for k, v in s.items()}
               for s in stats], f)
  title = os.path.basename(os.path.normpath(_CHECKPOINT.value))
  paths = plot(stats, _OUT_DIR.value, title=title, dpi=_DPI.value)
  print(table, end="")
  print("wrote " + ", ".join(paths + [os.path.join(_OUT_DIR.value, n) for n in
                                      ("route_stats.md", "stats.json")]))


if __name__ == "__main__":
  app.run(main)
