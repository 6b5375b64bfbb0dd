"""Public kernel API: one dispatch point per op, choosing an implementation by platform.

backend:
  "auto"          TPU: the Pallas Mosaic TPU kernel. GPU: `lax.ragged_dot` (XLA) until the
                  Pallas Triton kernel is measured faster on a GPU. CPU: the XLA reference.
  "xla"           reference.py (XLA ops; what CPU training runs).
  "pallas"        the Pallas kernel for this platform (Mosaic TPU or Triton GPU); an error on CPU.
  "interpret"     the TPU kernel in TPU interpret mode (any platform; for tests on CPU).
  "interpret_gpu" the GPU kernel in Pallas interpret mode (any platform; for tests on CPU).
Nothing falls back silently: a combination that does not exist raises. Expert-choice routing,
dispatch and combine are XLA on every platform (see `expert_choice`). The expert-choice expert
FFN (`ec_ffn`) has a Mosaic TPU kernel, used only when asked for ("pallas" / "interpret"):
"auto" is its XLA path on every platform until a TPU measurement says otherwise.
"""

import functools

import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name
from jaxtyping import Array, ArrayLike, Float, Int, Int32

from pallas_kernels import reference, target
from pallas_kernels.ec_ffn import tpu as ec_ffn_tpu
from pallas_kernels.gmm import gpu as gmm_gpu
from pallas_kernels.gmm import tpu as gmm_tpu

BACKENDS = ("auto", "xla", "pallas", "interpret", "interpret_gpu")
# Checkpoint names (jax.ad_checkpoint.checkpoint_name) of the residuals the expert-choice FFN
# kernel writes for its backward pass: the gathered rows, then the gate and up projections
# (the names the model gives its FFN projections). All three come out of one kernel call, so a
# remat policy that keeps all three spares the backward pass a rerun of the whole kernel.
EC_FFN_RESIDUAL_NAMES = ("expert_rows", "mlpwi_0", "mlpwi_1")
compile_for = target.compile_for

# implementation -> (kernel module, interpret flag)
_KERNELS = {
    "pallas_tpu": (gmm_tpu, False),
    "interpret_tpu": (gmm_tpu, True),
    "pallas_gpu": (gmm_gpu, False),
    "interpret_gpu": (gmm_gpu, True),
}


def resolve_backend(backend: str) -> str:
  """The grouped-matmul implementation `backend` means on the (target) platform:
  one of "xla", "pallas_tpu", "pallas_gpu", "interpret_tpu", "interpret_gpu"."""
  if backend not in BACKENDS:
    raise ValueError(f"backend={backend!r}; allowed values: {', '.join(BACKENDS)}")
  platform = target.platform()
  if backend == "auto":
    return "pallas_tpu" if platform == "tpu" else "xla"
  if backend == "pallas":
    if platform in ("tpu", "gpu"):
      return f"pallas_{platform}"
    raise NotImplementedError(
        f"backend='pallas' needs a TPU or GPU (this platform is {platform!r}); use backend='xla', "
        "or 'interpret' / 'interpret_gpu' to run the TPU / GPU kernel in interpret mode")
  return {"xla": "xla", "interpret": "interpret_tpu", "interpret_gpu": "interpret_gpu"}[backend]


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6))
def _gmm_kernel(lhs_MxK, rhs_GxKxN, group_sizes_G, first_group, out_dtype, tiling, impl):
  module, interpret = _KERNELS[impl]
  return module.gmm(lhs_MxK, rhs_GxKxN, group_sizes_G, first_group, out_dtype=out_dtype, tiling=tiling,
                    interpret=interpret)


def _gmm_kernel_fwd(lhs_MxK, rhs_GxKxN, group_sizes_G, first_group, out_dtype, tiling, impl):
  out_MxN = _gmm_kernel(lhs_MxK, rhs_GxKxN, group_sizes_G, first_group, out_dtype, tiling, impl)
  return out_MxN, (lhs_MxK, rhs_GxKxN, group_sizes_G, first_group)


def _gmm_kernel_bwd(out_dtype, tiling, impl, residuals, grad_MxN):
  """d_lhs = gmm(grad, rhs^T) (the kernel reads rhs transposed in place); d_rhs = tgmm(lhs, grad).
  Both run on the operands' dtype with float32 accumulation."""
  del out_dtype
  lhs_MxK, rhs_GxKxN, group_sizes_G, first_group = residuals
  module, interpret = _KERNELS[impl]
  grad_MxN = grad_MxN.astype(lhs_MxK.dtype)
  d_lhs = module.gmm(grad_MxN, rhs_GxKxN, group_sizes_G, first_group, out_dtype=lhs_MxK.dtype,
                     transpose_rhs=True, tiling=tiling, interpret=interpret)
  d_rhs = module.tgmm(lhs_MxK, grad_MxN, group_sizes_G, first_group, num_groups=rhs_GxKxN.shape[0],
                      out_dtype=rhs_GxKxN.dtype, tiling=tiling, interpret=interpret)
  return d_lhs, d_rhs, None, None


_gmm_kernel.defvjp(_gmm_kernel_fwd, _gmm_kernel_bwd)


def gmm(lhs: Float[Array, "M K"], rhs: Float[Array, "G_local K N"], group_sizes: Int[ArrayLike, "G"], *,
        group_offset: Int[ArrayLike, ""] | None = None, preferred_element_type=None, tiling=None,
        backend: str = "auto") -> Float[Array, "M N"]:
  """Grouped matmul [m, k] x [g, k, n] -> [m, n]; equals lax.ragged_dot(lhs, rhs, group_sizes).

  Rows of lhs are sorted by group; rows past sum(group_sizes) come out zero. With
  `group_offset`, rhs holds groups [group_offset, group_offset + rhs.shape[0]) only (expert
  parallelism) and the rows of every other group are zero. Differentiable in lhs and rhs.
  `tiling=(tm, tk, tn)` overrides the TPU kernel's modelled tiling, or the GPU kernel's blocks.
  """
  impl = resolve_backend(backend)
  group_sizes = jnp.asarray(group_sizes).astype(jnp.int32)
  dtype = jnp.promote_types(lhs.dtype, rhs.dtype)
  lhs, rhs = lhs.astype(dtype), rhs.astype(dtype)
  out_dtype = jnp.dtype(preferred_element_type or dtype)
  if impl == "xla":
    return reference.gmm(lhs, rhs, group_sizes, out_dtype, group_offset=group_offset)
  first = jnp.asarray(0 if group_offset is None else group_offset, jnp.int32)
  return _gmm_kernel(lhs, rhs, group_sizes, first, out_dtype, None if tiling is None else tuple(tiling), impl)


def tgmm(lhs: Float[Array, "M K"], grad: Float[Array, "M N"], group_sizes: Int[ArrayLike, "G"], *,
         group_offset: Int[ArrayLike, ""] | None = None, num_groups: int | None = None, preferred_element_type=None,
         tiling=None, backend: str = "auto") -> Float[Array, "G_out K N"]:
  """Transposed grouped matmul: out[g] = lhs[rows of g].T @ grad[rows of g], [num_groups, k, n].

  Groups group_offset .. group_offset + num_groups - 1 (default: all); empty groups give zeros.
  """
  impl = resolve_backend(backend)
  group_sizes = jnp.asarray(group_sizes).astype(jnp.int32)
  if num_groups is None:
    if group_offset is not None:
      raise ValueError("tgmm(group_offset=...) needs num_groups (how many groups from the offset on)")
    num_groups = group_sizes.shape[0]
  dtype = jnp.promote_types(lhs.dtype, grad.dtype)
  out_dtype = jnp.dtype(preferred_element_type or dtype)
  first = jnp.asarray(0 if group_offset is None else group_offset, jnp.int32)
  if impl == "xla":
    return reference.tgmm(lhs.astype(dtype), grad.astype(dtype), group_sizes, out_dtype, first, num_groups)
  module, interpret = _KERNELS[impl]
  return module.tgmm(lhs.astype(dtype), grad.astype(dtype), group_sizes, first, num_groups=num_groups,
                     out_dtype=out_dtype, tiling=None if tiling is None else tuple(tiling), interpret=interpret)


def _xla_only(op: str, backend: str):
  """Expert-choice routing, dispatch and combine are XLA top-k / gather / scatter-add on every
  platform ("auto" included, on TPU too): asking for a Pallas version is an error, not a
  silent fallback. See the package README section for why no Pallas kernel is used."""
  if backend not in BACKENDS:
    raise ValueError(f"backend={backend!r}; allowed values: {', '.join(BACKENDS)}")
  if backend not in ("auto", "xla"):
    raise NotImplementedError(f"pallas_kernels.{op}: backend={backend!r} does not exist; use 'auto' or 'xla'")


def expert_choice(logits: Float[Array, "G N E"], capacity, *, backend: str = "auto"
                  ) -> tuple[Int32[Array, "G E C"], Float[Array, "G E C"]]:
  """Each expert's top-`capacity` tokens of each routing group: logits [G, N, E] ->
  (token_idx [G, E, C] int32, scores [G, E, C]); ties go to the lower token index."""
  _xla_only("expert_choice", backend)
  return reference.expert_choice(logits, capacity)


def ec_dispatch(x: Float[Array, "G N D"], token_idx: Int[Array, "G E C"], *, backend: str = "auto"
                ) -> Float[Array, "G E C D"]:
  """x [G, N, D], token_idx [G, E, C] -> each expert's tokens [G, E, C, D]; differentiable."""
  _xla_only("ec_dispatch", backend)
  return reference.ec_dispatch(x, token_idx)


def ec_combine(y: Float[Array, "G E C D"], token_idx: Int[Array, "G E C"], weights: Float[Array, "G E C"] | None,
               num_tokens, *, backend: str = "auto") -> Float[Array, "G N D"]:
  """Scatter-add [G, E, C, D] -> [G, N, D] of expert outputs to their tokens, each weighted by
  weights [G, E, C] (None: unweighted); differentiable."""
  _xla_only("ec_combine", backend)
  return reference.ec_combine(y, token_idx, weights, num_tokens)


def resolve_ec_ffn_backend(backend: str) -> str:
  """The expert-choice FFN implementation `backend` means: "xla" (auto, xla: the default on every
  platform until the kernel is measured on a TPU), "pallas_tpu" or "interpret_tpu"."""
  if backend not in BACKENDS:
    raise ValueError(f"backend={backend!r}; allowed values: {', '.join(BACKENDS)}")
  if backend in ("auto", "xla"):
    return "xla"
  if backend == "interpret":
    return "interpret_tpu"
  if backend == "pallas" and target.platform() == "tpu":
    return "pallas_tpu"
  raise NotImplementedError(
      f"pallas_kernels.ec_ffn: backend={backend!r} does not exist on platform {target.platform()!r} (only a "
      "Mosaic TPU kernel exists); use 'auto' / 'xla', or 'interpret' to run the TPU kernel in interpret mode")


@functools.partial(jax.custom_vjp, nondiff_argnums=(6, 7))
def _ec_ffn_kernel(x_GxNxD, token_idx_GxExC, gates_GxExC, w_gate, w_up, w_down, tiles, interpret):
  return ec_ffn_tpu.ec_ffn(x_GxNxD, token_idx_GxExC, gates_GxExC, w_gate, w_up, w_down, tiles=tiles,
                           interpret=interpret)


def _ec_ffn_kernel_fwd(x_GxNxD, token_idx_GxExC, gates_GxExC, w_gate, w_up, w_down, tiles, interpret):
  """The kernel also writes the gathered rows and the gate/up projections: the backward pass
  needs them, and reading them back is cheaper than a second gather and two matmuls. They are
  named (EC_FFN_RESIDUAL_NAMES) for remat policies."""
  out, *saved = ec_ffn_tpu.ec_ffn(x_GxNxD, token_idx_GxExC, gates_GxExC, w_gate, w_up, w_down,
                                  tiles=tiles, interpret=interpret, residuals=True)
  rows, gate, up = (checkpoint_name(a, name) for a, name in zip(saved, EC_FFN_RESIDUAL_NAMES))
  return out, (x_GxNxD.shape[1], token_idx_GxExC, gates_GxExC, w_gate, w_up, w_down, rows, gate, up)


def _ec_ffn_kernel_bwd(tiles, interpret, residuals, grad_GxExCxD):
  """XLA, from the kernel's saved rows and gate/up projections (no gather, no recomputed matmul):
  autodiff of silu(gate) * up * g @ w_down, then the gate/up weight and row gradients as einsums;
  the row gradient is scatter-added to the tokens (`ec_dispatch`'s transpose)."""
  del tiles, interpret
  tokens, token_idx_GxExC, gates_GxExC, w_gate, w_up, w_down, rows_GxExCxD, gate_GxExCxF, up_GxExCxF = residuals
  grad_GxExCxD = grad_GxExCxD.astype(rows_GxExCxD.dtype)

  def down(gate, up, g, wd):
    return jnp.einsum("gecf,efd->gecd", jax.nn.silu(gate) * up * g[..., None], wd)
  _, vjp = jax.vjp(down, gate_GxExCxF, up_GxExCxF, gates_GxExC, w_down)
  d_gate, d_up, d_gates, d_wd = vjp(grad_GxExCxD)
  d_wg = jnp.einsum("gecd,gecf->edf", rows_GxExCxD, d_gate)
  d_wu = jnp.einsum("gecd,gecf->edf", rows_GxExCxD, d_up)
  d_rows = jnp.einsum("gecf,edf->gecd", d_gate, w_gate) + jnp.einsum("gecf,edf->gecd", d_up, w_up)
  d_x = reference.ec_combine(d_rows, token_idx_GxExC, None, tokens)
  return d_x, None, d_gates, d_wg, d_wu, d_wd


_ec_ffn_kernel.defvjp(_ec_ffn_kernel_fwd, _ec_ffn_kernel_bwd)


def ec_ffn(x: Float[Array, "G N D"], token_idx: Int[Array, "G E C"], gates: Float[Array, "G E C"],
           w_gate: Float[Array, "E D F"], w_up: Float[Array, "E D F"], w_down: Float[Array, "E F D"], *,
           tiles=None, backend: str = "auto") -> Float[Array, "G E C D"]:
  """Expert-choice expert FFN of one layer: ye[g, e, c] = ((silu(xs @ w_gate[e]) * (xs @ w_up[e]))
  * gates[g, e, c]) @ w_down[e], xs = x[g, token_idx[g, e, c]]: [G, E, C, D] in the promoted
  dtype of x and the weights (gates are cast to it). Differentiable in x, gates and the weights.

  "auto"/"xla": `ec_dispatch` + three batched einsums (what the model ran before the kernel).
  "pallas" (TPU) / "interpret": the Mosaic kernel (gather + SwiGLU + down projection in one
  call; backward in XLA). `tiles=(tc, tf)` overrides the kernel's modelled tiling.
  """
  impl = resolve_ec_ffn_backend(backend)
  dtype = functools.reduce(jnp.promote_types, (x.dtype, w_gate.dtype, w_up.dtype, w_down.dtype))
  x, w_gate, w_up, w_down = (a.astype(dtype) for a in (x, w_gate, w_up, w_down))
  gates = gates.astype(dtype)
  token_idx = token_idx.astype(jnp.int32)
  if impl == "xla":
    return reference.ec_ffn(x, token_idx, gates, w_gate, w_up, w_down)
  return _ec_ffn_kernel(x, token_idx, gates, w_gate, w_up, w_down, None if tiles is None else tuple(tiles),
                        impl == "interpret_tpu")
