"""Routers: pure functions from float32 router logits to a RoutingPlan."""

from moejax.routing.capacity import compute_capacity
from moejax.routing.capacity import num_groups_and_padding
from moejax.routing.plan import RoutingPlan
from moejax.routing.token_choice import assign_slots
from moejax.routing.token_choice import gate_probs
from moejax.routing.token_choice import token_choice
