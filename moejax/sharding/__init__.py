"""Meshes, logical axis rules, expert parallelism and multi-process setup.

  mesh = make_mesh({'data': -1, 'expert': 4})                 # Auto axes
  ep = ExpertParallel(mesh, mode='shard_map')                 # or 'gspmd'
  layer = init_sharded(lambda: build_moe(config, model_dim=M,
                                         rngs=nnx.Rngs(0),
                                         expert_parallel=ep), mesh)
  y, aux = layer(x)
  # or, on a built model: enable_expert_parallel(model, mesh, 'shard_map')

See docs/sharding.md.
"""

from moejax.sharding.expert_parallel import EP_MODES
from moejax.sharding.expert_parallel import ExpertLayout
from moejax.sharding.expert_parallel import ExpertParallel
from moejax.sharding.expert_parallel import enable_expert_parallel
from moejax.sharding.expert_parallel import expert_layout
from moejax.sharding.expert_parallel import group_local
from moejax.sharding.expert_parallel import run_engine_ep
from moejax.sharding.mesh import MESH_AXES
from moejax.sharding.mesh import make_mesh
from moejax.sharding.multihost import ProcessInfo
from moejax.sharding.multihost import initialize
from moejax.sharding.multihost import shutdown
from moejax.sharding.ragged import padded_ragged_all_to_all
from moejax.sharding.ragged import ragged_all_to_all
from moejax.sharding.rules import DEFAULT_RULES
from moejax.sharding.rules import init_sharded
from moejax.sharding.rules import logical_to_spec
from moejax.sharding.rules import make_rules
from moejax.sharding.rules import module_shardings
from moejax.sharding.rules import shard_module
from moejax.sharding.rules import state_shardings
from moejax.sharding.rules import state_specs
