"""Which kernel family runs, and the block shapes it is allowed to use.

Backends:

* ``'triton'``: Pallas on GPU through Triton (Ampere, Hopper, Blackwell, ROCm).
* ``'mosaic'``: Pallas on TPU through Mosaic.
* ``'xla'``: no kernel: the XLA paths of moejax.ops (what CPU runs).
* ``'triton_interpret'`` / ``'mosaic_interpret'``: the same kernel bodies run
  by the Pallas interpreter (any platform, slow: tests only).
* ``'auto'`` (default): GPU -> triton, TPU -> mosaic, anything else -> xla.

Why Triton and not Mosaic GPU on Hopper is argued in docs/pallas.md: the
Triton kernels are plain Pallas (ref slicing, dot_general, fori_loop) that the
generic interpreter runs on CPU and that lower unchanged on jax 0.10 and 0.11;
Mosaic GPU's surface (plgpu.kernel, warp-specialised pipelines) is Hopper-only
and still moving between releases.

The block rules live here so that interpret mode uses exactly the blocks (and
padding) the real backend would.
"""

import dataclasses

import jax

BACKENDS = ("auto", "triton", "mosaic", "xla", "triton_interpret",
            "mosaic_interpret")
KINDS = ("triton", "mosaic", "xla")


@dataclasses.dataclass(frozen=True)
class Backend:
  """A resolved backend: kernel family and whether it is interpreted."""
  kind: str  # 'triton', 'mosaic' or 'xla'
  interpret: bool = False

  @property
  def name(self):
    return self.kind + ("_interpret" if self.interpret else "")


def platform_kind(platform=None):
  """The kernel family for a JAX platform name ('gpu', 'tpu', 'cpu', ...)."""
  platform = platform or jax.default_backend()
  if platform in ("gpu", "cuda", "rocm"):
    return "triton"
  if platform == "tpu":
    return "mosaic"
  return "xla"


def resolve_backend(backend="auto"):
  """Turns a backend name (or a Backend) into a Backend.

  Args:
    backend: one of BACKENDS or a Backend.
  Returns:
    Backend; 'auto' picks from jax.default_backend().
  """
  if isinstance(backend, Backend):
    if backend.kind not in KINDS:
      raise ValueError(f"unknown backend kind {backend.kind!r}; allowed: "
                       f"{list(KINDS)}")
    return backend
  if backend not in BACKENDS:
    raise ValueError(f"unknown Pallas backend {backend!r}; allowed: "
                     f"{list(BACKENDS)}")
  if backend == "auto":
    return Backend(platform_kind())
  if backend.endswith("_interpret"):
    return Backend(backend[:-len("_interpret")], True)
  return Backend(backend)


def cdiv(a, b):
  return -(-a // b)


def round_up(a, b):
  return cdiv(a, b) * b


def largest_pow2_divisor(n, cap):
  """Largest power of two that divides n and is at most cap (n >= 1)."""
  b = 1
  while b * 2 <= cap and n % (b * 2) == 0:
    b *= 2
  return b


def next_pow2(n):
  b = 1
  while b < n:
    b *= 2
  return b


def pick_block(dim, cap, kind, *, minimum=16):
  """A block size for one array dimension and the dimension padded to it.

  Triton: blocks are powers of two of at least `minimum` (tl.dot needs 16);
  a power of two dividing `dim` is used when it is at least cap/4, otherwise
  `dim` is padded. Mosaic: the full dimension when it is at most `cap`, else
  the largest multiple of 128 that divides `dim` (padding `dim` to a multiple
  of 128 first when needed), as Mosaic wants minor block dims that are
  multiples of 128 or the full array dim.

  Returns:
    (block, padded_dim) with padded_dim % block == 0.
  """
  if kind == "triton":
    if dim <= cap:
      block = next_pow2(max(dim, minimum))
      return block, block
    block = largest_pow2_divisor(dim, cap)
    if block >= max(cap // 4, minimum):
      return block, dim
    block = 1 << (cap.bit_length() - 1)  # largest power of two <= cap
    return block, round_up(dim, block)
  if kind == "mosaic":
    if dim <= cap:
      return dim, dim
    padded = round_up(dim, 128)
    block = 128
    for b in range(128, cap + 1, 128):
      if padded % b == 0:
        block = b
    return block, padded
  raise ValueError(f"no blocks for backend kind {kind!r}")


def row_block(tile, cap, backend, dtype):
  """Rows per grid step of the grouped matmuls: a divisor of `tile`.

  Each block of rows then lies inside one group of the tile-aligned layout.
  Real (not interpreted) backends check their hardware constraints here.
  """
  block = largest_pow2_divisor(tile, cap)
  if tile <= cap and backend.kind == "mosaic":
    block = tile
  if not backend.interpret:
    sublanes = 16 if jax.numpy.dtype(dtype).itemsize == 2 else 8
    need = 16 if backend.kind == "triton" else sublanes
    if block % need:
      raise ValueError(
          f"tile={tile} gives row blocks of {block}; the {backend.kind} "
          f"backend needs a multiple of {need} (use a dropless tile that is "
          f"a multiple of {need}, e.g. 128)")
  return block


def pad_axis(x, axis, size, value=0):
  """Pads x along `axis` up to `size` with `value` (no-op if already there)."""
  extra = size - x.shape[axis]
  if extra == 0:
    return x
  widths = [(0, 0)] * x.ndim
  widths[axis] = (0, extra)
  return jax.numpy.pad(x, widths, constant_values=value)
