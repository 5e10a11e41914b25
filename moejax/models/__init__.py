"""Models built from moejax.layers: a decoder-only LM and a ViT classifier,
with MoE placement, FLOP matching and parameter/FLOP accounting."""

from moejax.models.accounting import active_experts_per_token
from moejax.models.accounting import count_params
from moejax.models.accounting import describe
from moejax.models.accounting import flops_breakdown
from moejax.models.accounting import flops_per_token
from moejax.models.accounting import matched_dense_mlp_dim
from moejax.models.accounting import num_params
from moejax.models.common import every_n_placement
from moejax.models.common import flop_matched_dense_mlp_dim
from moejax.models.common import vmoe_placement
from moejax.models.decoder import DecoderLM
from moejax.models.vit import ViTClassifier
from moejax.models.vit import patchify
from moejax.models.hf import from_pretrained
from moejax.models.hf import save_pretrained
from moejax.models.upcycling import upcycle
from moejax.models.upcycling import upcycle_params
