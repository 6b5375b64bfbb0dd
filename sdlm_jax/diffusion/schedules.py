"""Masking schedules alpha(t): the probability that a token is still clean at time t.

mask_prob(t) = 1 - alpha(t); the MDLM ELBO weight is w(t) = -alpha'(t) / (1 - alpha(t)).
  linear  alpha = 1 - t               w = 1/t
  poly2   alpha = 1 - t^2             w = 2/t
  cosine  alpha = 1 - cos(pi/2 (1-t))  w = (pi/2) tan(pi/2 (1-t))
"""

import dataclasses
import math
from typing import Callable

import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class Schedule:
  name: str
  alpha: Callable
  weight: Callable

  def mask_prob(self, t):
    return 1.0 - self.alpha(t)


_SCHEDULES = {
    "linear": Schedule("linear", lambda t: 1.0 - t, lambda t: 1.0 / t),
    "poly2": Schedule("poly2", lambda t: 1.0 - t * t, lambda t: 2.0 / t),
    "cosine": Schedule("cosine", lambda t: 1.0 - jnp.cos(math.pi / 2 * (1.0 - t)),
                       lambda t: math.pi / 2 * jnp.tan(math.pi / 2 * (1.0 - t))),
}
SCHEDULE_NAMES = tuple(_SCHEDULES)


def get_schedule(name: str) -> Schedule:
  if name not in _SCHEDULES:
    raise ValueError(f"diffusion.schedule={name!r}; allowed values: {', '.join(SCHEDULE_NAMES)}")
  return _SCHEDULES[name]
