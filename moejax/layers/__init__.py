"""Flax NNX layers and the dispatch engines they run on."""

from moejax.layers.dispatch import ENGINES
from moejax.layers.dispatch import ExpertWeights
from moejax.layers.dispatch import run_engine
from moejax.layers.experts import Experts
from moejax.layers.experts import expert_ffn
from moejax.layers.ffn import DenseFFN
from moejax.layers.moe import MoEAux
from moejax.layers.moe import MoELayer
from moejax.layers.moe import MoELosses
from moejax.layers.moe import ROUTERS
from moejax.layers.moe import RouterBias
from moejax.layers.soft_moe import SoftMoELayer
from moejax.layers.transformer import LayerNorm
from moejax.layers.transformer import MultiHeadAttention
from moejax.layers.transformer import RMSNorm
from moejax.layers.transformer import TransformerBlock
from moejax.layers.transformer import apply_rope
from moejax.layers.transformer import stack_aux
from moejax.layers.transformer import total_aux_loss
