"""Run-time shape and dtype checks are on in the test suite (pytest.ini: --jaxtyping-packages).

Every case below is a call that the function's own jax code would run without complaint
(broadcasting, a sum over the wrong length, a float where an id belongs), so only the
jaxtyping annotation can reject it: if the checking were off, these tests would fail.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jaxtyping import TypeCheckError

import pallas_kernels as pk
from sdlm_jax.diffusion import corruption, losses
from sdlm_jax.model import routing


def test_well_typed_calls_pass():
  ce_BxL = jnp.ones((2, 3))
  is_masked_BxL = jnp.array([[True, False, True], [False, False, True]])
  np.testing.assert_allclose(losses.masked_ce_row_sum(ce_BxL, is_masked_BxL), [2.0, 1.0])
  valid_BxL = jnp.ones((2, 3), bool)
  np.testing.assert_allclose(jax.jit(losses.megadlm_row_weights)(is_masked_BxL, valid_BxL), [1.5, 3.0])


def test_mismatched_dimension_is_rejected():
  # [1, 3] would broadcast against [2, 3]; the shared name B says both rows counts must agree.
  with pytest.raises(TypeCheckError, match="is_masked_BxL"):
    losses.masked_ce_row_sum(jnp.ones((2, 3)), jnp.ones((1, 3), bool))


def test_mismatched_dimension_is_rejected_under_jit():
  # Each row sum has length 2 either way; only L (3 vs 4) tells the two masks apart.
  with pytest.raises(TypeCheckError, match="valid_BxL"):
    jax.jit(losses.megadlm_row_weights)(jnp.ones((2, 3), bool), jnp.ones((2, 4), bool))


def test_wrong_dtype_is_rejected():
  with pytest.raises(TypeCheckError, match="tokens_BxL"):
    corruption.apply_mask(jnp.ones((2, 3), jnp.float32), jnp.zeros((2, 3), bool), 0)
  with pytest.raises(TypeCheckError, match="token_mask_N"):
    routing.router_z_loss(jnp.zeros((4, 2)), jnp.ones((4,), jnp.float32))


def test_kernel_api_is_checked():
  # lax.top_k accepts integer logits; the kernel API takes float router logits only.
  with pytest.raises(TypeCheckError, match="logits"):
    pk.expert_choice(jnp.zeros((1, 8, 4), jnp.int32), 2)
