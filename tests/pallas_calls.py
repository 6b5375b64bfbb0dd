"""The Pallas kernels a jaxpr runs, for tests that count how often a kernel runs (e.g. under remat)."""

from jax.extend.core import jaxprs_in_params


def pallas_call_params(jaxpr) -> list[str]:
  """The params, as text, of every pallas_call in `jaxpr`, nested jaxprs included, in order."""
  out = []
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == "pallas_call":
      out.append(str(eqn.params))
    for sub in jaxprs_in_params(eqn.params):
      out += pallas_call_params(sub)
  return out
