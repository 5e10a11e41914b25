"""Meshes, logical axis rules, expert parallelism and multi-process setup.

  mesh = make_mesh({'data': -1, 'expert': 4})                 # Auto axes
  layer = init_sharded(lambda: MoELayer(..., mesh=mesh,
                                        expert_parallel='shard_map',
                                        rngs=nnx.Rngs(0)), mesh)
  y, aux = layer(x)

See docs/sharding.md.
"""

from moejax.sharding.expert_parallel import EP_MODES
from moejax.sharding.expert_parallel import ExpertLayout
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
