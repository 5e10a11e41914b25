"""ragged_all_to_all, and a padded all_to_all fallback with the same contract.

`jax.lax.ragged_all_to_all` moves variable-length row slices between the
devices of a mesh axis (GPU, TPU). XLA:CPU does not implement it, so on CPU
`padded_ragged_all_to_all` does the same thing with a dense all_to_all: each
device packs the slices for each peer into a block padded to a static worst
case (`max_rows_per_peer`, by default every row of the operand), exchanges
the [peers, rows, ...] blocks with jax.lax.all_to_all, and writes the
received rows at the offsets the senders asked for. It moves the same rows to
the same places, so results are identical; it costs peers * max_rows_per_peer
rows of buffer and bandwidth instead of the rows actually sent.

Both are called inside jax.shard_map and take ragged_all_to_all's arguments
(see its docstring): `operand` rows [input_offsets[q], +send_sizes[q]) go to
peer q // slices_per_peer, written there at output_offsets[q]; recv_sizes[q]
is how many rows arrive from slice q of peer q // slices_per_peer.
"""

import jax
import jax.numpy as jnp

COLLECTIVES = ("auto", "ragged", "padded")


def backend_has_ragged_all_to_all(platform: str) -> bool:
  """Whether XLA implements ragged_all_to_all on this platform."""
  return platform in ("gpu", "cuda", "rocm", "tpu")


def resolve_collective(collective: str, platform: str) -> str:
  """'auto' -> 'ragged' on GPU/TPU, 'padded' on CPU; checks the name."""
  if collective not in COLLECTIVES:
    raise ValueError(f"unknown dropless collective {collective!r}; allowed: "
                     f"{list(COLLECTIVES)}")
  if collective == "auto":
    return "ragged" if backend_has_ragged_all_to_all(platform) else "padded"
  if collective == "ragged" and not backend_has_ragged_all_to_all(platform):
    raise ValueError(f"ragged_all_to_all is not implemented by XLA on "
                     f"{platform!r}; use collective='padded' (or 'auto')")
  return collective


def _pack_positions(sizes_XQ, offsets_XQ, num_rows, sentinel):
  """Row index of every position of every peer's packed block.

  Args:
    sizes_XQ: <int32>[X, Q] rows of slice q for peer x.
    offsets_XQ: <int32>[X, Q] start row of each slice (in the unpacked array).
    num_rows: P, positions per block.
    sentinel: the index returned for positions past the block's rows.
  Returns:
    <int32>[X, P] unpacked row of each packed position (sentinel if none).
  """
  ends_XQ = jnp.cumsum(sizes_XQ, axis=1)
  starts_XQ = ends_XQ - sizes_XQ
  t_P = jnp.arange(num_rows, dtype=jnp.int32)
  q = sizes_XQ.shape[1]
  slice_XP = jax.vmap(lambda e: jnp.searchsorted(e, t_P, side="right"))(
      ends_XQ).astype(jnp.int32)
  valid_XP = slice_XP < q
  safe_XP = jnp.minimum(slice_XP, q - 1)
  take = lambda a: jnp.take_along_axis(a, safe_XP, axis=1)
  row_XP = take(offsets_XQ) + t_P[None, :] - take(starts_XQ)
  return jnp.where(valid_XP, row_XP, sentinel).astype(jnp.int32)


def padded_ragged_all_to_all(operand, output, input_offsets, send_sizes,
                             output_offsets, recv_sizes, *, axis_name,
                             axis_size, max_rows_per_peer=None):
  """ragged_all_to_all through a padded dense all_to_all (any backend).

  Args:
    operand: <dtype>[N, ...] rows to send.
    output: <dtype>[R, ...] the buffer received rows are written into.
    input_offsets, send_sizes, output_offsets, recv_sizes: <int32>[X*Q] as
      jax.lax.ragged_all_to_all (Q slices per peer).
    axis_name: the mesh axis (inside shard_map).
    axis_size: X, its size (static).
    max_rows_per_peer: static bound on the rows sent to one peer; default
      N. Rows past it are not sent (with the default none can be).
  Returns:
    <dtype>[R, ...]: output with the received rows written in.
  """
  x = axis_size
  n = operand.shape[0]
  p = n if max_rows_per_peer is None else max_rows_per_peer
  q = send_sizes.shape[0] // x
  send_XQ = send_sizes.reshape(x, q).astype(jnp.int32)
  row_XP = _pack_positions(send_XQ, input_offsets.reshape(x, q).astype(
      jnp.int32), p, n)
  block_XPD = jnp.take(operand, row_XP.reshape(-1), axis=0, mode="fill",
                       fill_value=0).reshape((x, p) + operand.shape[1:])
  # Exchange the blocks, and the offsets the senders want them written at.
  recv_XPD = jax.lax.all_to_all(block_XPD, axis_name, 0, 0, tiled=True)
  out_off_XQ = jax.lax.all_to_all(output_offsets.reshape(x, q).astype(
      jnp.int32), axis_name, 0, 0, tiled=True)
  r = output.shape[0]
  dest_XP = _pack_positions(recv_sizes.reshape(x, q).astype(jnp.int32),
                            out_off_XQ, p, r)
  return output.at[dest_XP.reshape(-1)].set(
      recv_XPD.reshape((x * p,) + operand.shape[1:]), mode="drop",
      unique_indices=True)


def ragged_all_to_all(operand, output, input_offsets, send_sizes,
                      output_offsets, recv_sizes, *, axis_name, axis_size,
                      collective="ragged", max_rows_per_peer=None):
  """Dispatches to jax.lax.ragged_all_to_all or the padded fallback.

  Args:
    collective: 'ragged' (jax.lax.ragged_all_to_all) or 'padded'
      (padded_ragged_all_to_all); resolve 'auto' with resolve_collective.
    axis_name: the mesh axis, or None for a local copy (no such axis).
    Other arguments: as padded_ragged_all_to_all.
  Returns:
    <dtype>[R, ...].
  """
  if axis_name is None:
    # No mesh axis to talk over: every slice stays on this device.
    return _local_ragged_copy(operand, output, input_offsets, send_sizes,
                              output_offsets)
  if collective == "padded":
    return padded_ragged_all_to_all(
        operand, output, input_offsets, send_sizes, output_offsets,
        recv_sizes, axis_name=axis_name, axis_size=axis_size,
        max_rows_per_peer=max_rows_per_peer)
  if collective == "ragged":
    i32 = lambda a: a.astype(jnp.int32)
    return jax.lax.ragged_all_to_all(
        operand, output, i32(input_offsets), i32(send_sizes),
        i32(output_offsets), i32(recv_sizes), axis_name=axis_name)
  raise ValueError(f"collective must be 'ragged' or 'padded', got "
                   f"{collective!r}")


def _local_ragged_copy(operand, output, input_offsets, send_sizes,
                       output_offsets):
  """The one-device case: copy each slice within the device."""
  n = operand.shape[0]
  src_1P = _pack_positions(send_sizes[None].astype(jnp.int32),
                           input_offsets[None].astype(jnp.int32), n, n)
  dst_1P = _pack_positions(send_sizes[None].astype(jnp.int32),
                           output_offsets[None].astype(jnp.int32), n,
                           output.shape[0])
  rows = jnp.take(operand, src_1P[0], axis=0, mode="fill", fill_value=0)
  return output.at[dst_1P[0]].set(rows, mode="drop", unique_indices=True)
