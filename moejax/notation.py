"""Axis-letter glossary and logical axis names.

Every tensor carries its shape in its name, one capital letter per axis, and
the letters match the einsum strings exactly: `x_GSM`, `logits_GSE`,
`combine_GSEC`, `w_in_EMH`.
"""

AXIS_LETTERS = {
    "B": "batch",
    "L": "sequence length",
    "M": "model width (d_model)",
    "H": "expert hidden width",
    "V": "vocabulary",
    "G": "token groups (routing is independent per group)",
    "S": "tokens per group",
    "E": "experts",
    "C": "expert capacity (slots per expert per group)",
    "K": "experts chosen per token",
    "P": "Soft MoE slots per expert",
    "T": "tokens (flattened G*S)",
    # Attention and model heads (moejax.layers.transformer, moejax.models).
    "N": "attention heads",
    "D": "attention head width",
    "J": "attended (key/value) positions; same length as L in self-attention",
    "F": "flattened patch features (patch_h * patch_w * channels)",
    "Y": "classes (classifier outputs)",
}

# Logical axis names used in parameter annotations; sharding rules map them
# to mesh axes (data, fsdp, expert, tensor).
BATCH = "batch"
LENGTH = "length"
EMBED = "embed"
MLP = "mlp"
EXPERT = "expert"
VOCAB = "vocab"
HEADS = "heads"

LOGICAL_AXES = (BATCH, LENGTH, EMBED, MLP, EXPERT, VOCAB, HEADS)
