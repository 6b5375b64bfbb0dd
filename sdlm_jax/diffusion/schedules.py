"""Masking schedules alpha(t): the probability that a token is still clean at time t in [0, 1].

mask_prob(t) = 1 - alpha(t) is the chance a token is [MASK] at time t, and
weight(t) = -alpha'(t) / (1 - alpha(t)) is the MDLM ELBO weight of the masked cross-entropy:
  linear  alpha = 1 - t                w = 1/t
  poly2   alpha = 1 - t^2              w = 2/t
  cosine  alpha = 1 - cos(pi/2 (1-t))  w = (pi/2) tan(pi/2 (1-t))
Every weight diverges at t = 0, which is why the ELBO samples t >= diffusion.t_min.
Derivations: docs/formulas.md, section 1.
"""

import dataclasses
import math
from collections.abc import Callable

import jax.numpy as jnp
from jaxtyping import ArrayLike, Float


@dataclasses.dataclass(frozen=True)
class Schedule:
  """alpha(t) and its ELBO weight; both accept floats or arrays of t."""
  name: str
  alpha: Callable
  weight: Callable

  def mask_prob(self, t: Float[ArrayLike, "*T"]) -> Float[ArrayLike, "*T"]:
    return 1.0 - self.alpha(t)

  def decay_rate(self, t: Float[ArrayLike, "*T"]) -> Float[ArrayLike, "*T"]:
    """-alpha'(t) / alpha(t) = weight * (1 - alpha) / alpha: the uniform kernel's jump rate (infinite at t = 1)."""
    return self.weight(t) * self.mask_prob(t) / self.alpha(t)


_HALF_PI = math.pi / 2
_SCHEDULES = {
    "linear": Schedule("linear", lambda t: 1.0 - t, lambda t: 1.0 / t),
    "poly2": Schedule("poly2", lambda t: 1.0 - t * t, lambda t: 2.0 / t),
    "cosine": Schedule("cosine", lambda t: 1.0 - jnp.cos(_HALF_PI * (1.0 - t)),
                       lambda t: _HALF_PI * jnp.tan(_HALF_PI * (1.0 - t))),
}
SCHEDULE_NAMES = tuple(_SCHEDULES)


def get_schedule(name: str) -> Schedule:
  """The schedule called `name` (config field `diffusion.schedule`)."""
  if name not in _SCHEDULES:
    raise ValueError(f"diffusion.schedule={name!r} is not supported; allowed values: {', '.join(SCHEDULE_NAMES)}")
  return _SCHEDULES[name]
