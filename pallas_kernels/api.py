"""Public kernel API: one dispatch point per op, choosing a backend by platform.

backend: "auto" (by platform), "xla" (reference.py), "pallas" (hardware kernel),
"interpret" (Pallas kernel in interpret mode, for CPU testing).
"""

import jax

from pallas_kernels import reference

BACKENDS = ("auto", "xla", "pallas", "interpret")


def resolve_backend(backend: str) -> str:
  if backend not in BACKENDS:
    raise ValueError(f"backend={backend!r}; allowed values: {', '.join(BACKENDS)}")
  if backend != "auto":
    return backend
  return "xla"


def _unavailable(op, backend):
  raise NotImplementedError(
      f"pallas_kernels.{op}: backend={backend!r} is not implemented yet; use backend='xla'")


def gmm(lhs, rhs, group_sizes, *, group_offset=None, preferred_element_type=None,
        tiling=None, backend="auto"):
  del tiling
  backend = resolve_backend(backend)
  if group_offset is not None:
    _unavailable("gmm(group_offset=...)", backend)
  if backend != "xla":
    _unavailable("gmm", backend)
  return reference.gmm(lhs, rhs, group_sizes, preferred_element_type)


def tgmm(lhs, grad, group_sizes, *, preferred_element_type=None, tiling=None, backend="auto"):
  del tiling
  backend = resolve_backend(backend)
  if backend != "xla":
    _unavailable("tgmm", backend)
  return reference.tgmm(lhs, grad, group_sizes, preferred_element_type)


def expert_choice(logits, capacity, *, backend="auto"):
  backend = resolve_backend(backend)
  if backend != "xla":
    _unavailable("expert_choice", backend)
  return reference.expert_choice(logits, capacity)


def ec_dispatch(x, token_idx, *, backend="auto"):
  backend = resolve_backend(backend)
  if backend != "xla":
    _unavailable("ec_dispatch", backend)
  return reference.ec_dispatch(x, token_idx)


def ec_combine(y, token_idx, weights, num_tokens, *, backend="auto"):
  backend = resolve_backend(backend)
  if backend != "xla":
    _unavailable("ec_combine", backend)
  return reference.ec_combine(y, token_idx, weights, num_tokens)
