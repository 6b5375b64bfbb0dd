"""Public kernel API: one dispatch point per op, choosing a backend by platform.

backend: "auto" (by platform), "xla" (reference.py), "pallas" (the hardware kernel),
"interpret" (the Pallas TPU kernel in interpret mode, for testing on CPU). "auto" picks the
Pallas TPU kernel on TPU and XLA elsewhere: on GPU `lax.ragged_dot` until a Pallas GPU kernel
measures faster; on CPU the XLA reference. A backend that does not exist for the platform
raises; nothing ever falls back to interpret mode on hardware.
"""

import contextlib
import functools

import jax
import jax.numpy as jnp

from pallas_kernels import reference
from pallas_kernels.gmm import tpu as gmm_tpu

BACKENDS = ("auto", "xla", "pallas", "interpret")
_TARGET = []


@contextlib.contextmanager
def compile_for(platform: str):
  """Resolves backends for `platform` instead of the local one: for ahead-of-time
  compilation on a CPU host against a TPU topology (jax.experimental.topologies)."""
  _TARGET.append(platform)
  try:
    yield
  finally:
    _TARGET.pop()


def resolve_backend(backend: str) -> str:
  if backend not in BACKENDS:
    raise ValueError(f"backend={backend!r}; allowed values: {', '.join(BACKENDS)}")
  platform = _TARGET[-1] if _TARGET else jax.default_backend()
  if backend == "auto":
    return "pallas" if platform == "tpu" else "xla"
  if backend == "pallas" and platform != "tpu":
    raise NotImplementedError(
        f"backend='pallas' has a TPU kernel only (this platform is {platform!r}); "
        "use backend='xla', or 'interpret' to run the TPU kernel in interpret mode")
  return backend


def _only_xla(op: str, backend: str):
  """Expert-choice routing, dispatch and combine are XLA top-k/gather/scatter on every
  platform ("auto" included, on TPU too); asking for a Pallas version is an error."""
  if backend not in BACKENDS:
    raise ValueError(f"backend={backend!r}; allowed values: {', '.join(BACKENDS)}")
  if backend not in ("auto", "xla"):
    raise NotImplementedError(f"pallas_kernels.{op}: backend={backend!r} does not exist; use 'auto' or 'xla'")


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6, 7))
def _gmm_pallas(lhs, rhs, group_sizes, first_group, num_local, out_dtype, tiling, interpret):
  return gmm_tpu.gmm(lhs, rhs, group_sizes, first_group, num_groups_local=num_local, out_dtype=out_dtype,
                     tiling=tiling, interpret=interpret)


def _gmm_fwd(lhs, rhs, group_sizes, first_group, num_local, out_dtype, tiling, interpret):
  out = _gmm_pallas(lhs, rhs, group_sizes, first_group, num_local, out_dtype, tiling, interpret)
  return out, (lhs, rhs, group_sizes, first_group)


def _gmm_bwd(num_local, out_dtype, tiling, interpret, residuals, grad):
  lhs, rhs, group_sizes, first_group = residuals
  grad = grad.astype(lhs.dtype)
  d_lhs = gmm_tpu.gmm(grad, jnp.swapaxes(rhs, 1, 2), group_sizes, first_group, num_groups_local=num_local,
                      out_dtype=lhs.dtype, tiling=tiling, interpret=interpret)
  d_rhs = gmm_tpu.tgmm(lhs, grad, group_sizes, first_group, num_groups_local=num_local,
                       out_dtype=rhs.dtype, tiling=tiling, interpret=interpret)
  return d_lhs, d_rhs, None, None


_gmm_pallas.defvjp(_gmm_fwd, _gmm_bwd)


def gmm(lhs, rhs, group_sizes, *, group_offset=None, preferred_element_type=None, tiling=None, backend="auto"):
  """Grouped matmul; equals lax.ragged_dot(lhs, rhs, group_sizes), rows past the groups zero.

  With `group_offset`, rhs holds groups [group_offset, group_offset + rhs.shape[0]) only and
  rows of every other group are zero (expert parallelism).
  """
  backend = resolve_backend(backend)
  group_sizes = group_sizes.astype(jnp.int32)
  out_dtype = jnp.dtype(preferred_element_type or lhs.dtype)
  if backend == "xla":
    return reference.gmm(lhs, rhs, group_sizes, out_dtype, group_offset=group_offset)
  first = jnp.asarray(0 if group_offset is None else group_offset, jnp.int32)
  return _gmm_pallas(lhs, rhs, group_sizes, first, rhs.shape[0], out_dtype,
                     None if tiling is None else tuple(tiling), backend == "interpret")


def tgmm(lhs, grad, group_sizes, *, group_offset=None, num_groups=None, preferred_element_type=None, tiling=None,
         backend="auto"):
  """out[g] = lhs[rows of g].T @ grad[rows of g]: [num_groups, k, n]."""
  backend = resolve_backend(backend)
  group_sizes = group_sizes.astype(jnp.int32)
  num_groups = num_groups or group_sizes.shape[0]
  out_dtype = jnp.dtype(preferred_element_type or lhs.dtype)
  first = 0 if group_offset is None else group_offset
  if backend == "xla":
    full = reference.tgmm(lhs, grad, group_sizes, out_dtype)
    return jax.lax.dynamic_slice_in_dim(full, first, num_groups, axis=0)
  return gmm_tpu.tgmm(lhs, grad, group_sizes, jnp.asarray(first, jnp.int32), num_groups_local=num_groups,
                      out_dtype=out_dtype, tiling=None if tiling is None else tuple(tiling),
                      interpret=backend == "interpret")


def expert_choice(logits, capacity, *, backend="auto"):
  _only_xla("expert_choice", backend)
  return reference.expert_choice(logits, capacity)


def ec_dispatch(x, token_idx, *, backend="auto"):
  _only_xla("ec_dispatch", backend)
  return reference.ec_dispatch(x, token_idx)


def ec_combine(y, token_idx, weights, num_tokens, *, backend="auto"):
  _only_xla("ec_combine", backend)
  return reference.ec_combine(y, token_idx, weights, num_tokens)
