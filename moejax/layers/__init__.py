"""Flax NNX layers: routers, engines, experts and the MoE layers they compose.

  from moejax import layers as L
  layer = L.MoELayer(router=L.TokenChoiceRouter(M, E, k=2, rngs=rngs),
                     experts=L.Experts(E, M, H, rngs=rngs),
                     engine=L.IndicesEngine(), capacity_factor=1.25)
  layer = L.build_moe({"router": {"name": "token_choice", "k": 2}, ...},
                      model_dim=M, rngs=rngs)
"""

from moejax.layers.build import ENGINES
from moejax.layers.build import ROUTERS
from moejax.layers.build import MoEConfigError
from moejax.layers.build import build_moe
from moejax.layers.build import config_for_layer
from moejax.layers.engines import DroplessEngine
from moejax.layers.engines import EinsumEngine
from moejax.layers.engines import Engine
from moejax.layers.engines import IndicesEngine
from moejax.layers.engines import PallasEngine
from moejax.layers.experts import Experts
from moejax.layers.experts import expert_ffn
from moejax.layers.ffn import DenseFFN
from moejax.layers.moe import MoEAux
from moejax.layers.moe import MoELayer
from moejax.layers.moe import ResidualBranch
from moejax.layers.moe import update_routers
from moejax.layers.moe import weighted_sum
from moejax.layers.routers import BalancedRouter
from moejax.layers.routers import CosineRouter
from moejax.layers.routers import DeepSeekRouter
from moejax.layers.routers import ExpertChoiceRouter
from moejax.layers.routers import HashRouter
from moejax.layers.routers import NoisyTopKRouter
from moejax.layers.routers import Router
from moejax.layers.routers import RouterBias
from moejax.layers.routers import RouterOutput
from moejax.layers.routers import TokenChoiceRouter
from moejax.layers.soft_moe import SoftMoELayer
from moejax.layers.transformer import LayerNorm
from moejax.layers.transformer import MultiHeadAttention
from moejax.layers.transformer import RMSNorm
from moejax.layers.transformer import TransformerBlock
from moejax.layers.transformer import apply_rope
from moejax.layers.transformer import stack_aux
from moejax.layers.transformer import total_aux_loss
from moejax.ops.ffn import ExpertWeights
