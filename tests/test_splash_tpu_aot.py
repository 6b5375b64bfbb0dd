"""Splash attention compiles for real TPUs (Mosaic, through libtpu) on this CPU host, at the
seed size (a v5p-128 chip's share of batch 256 x 2048: 4 sequences of 2048, 16 heads of 128,
bf16), forward and backward; its cost is declared, so XLA's count of the compiled program
matches the kernel's work and a model with splash keeps an honest FLOPs ratio."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import aot as kernel_aot
from pallas_kernels import target
from sdlm_jax import aot
from sdlm_jax.config_files import repo_module
from sdlm_jax.model import splash

pytestmark = pytest.mark.tpu_aot
pytest.importorskip("jax.experimental.topologies")

B, L, H, K = 4, 2048, 16, 128


def _fwd_bwd(causal):
  def fn(q, k, v, seg, cot):
    out, vjp = jax.vjp(lambda q, k, v: splash.splash_attention(q, k, v, seg, causal=causal), q, k, v)
    return out, vjp(cot)
  return fn


def _declared_flops(causal, groups=H):
  spec = splash.Spec(length=L, q_heads=H if groups == H else H // groups, head_dim=K, mqa=groups != H,
                     causal=causal, block=splash.MAX_BLOCK, itemsize=2, interpret=False)
  per_call = sum(c.flops for c in splash.kernel_costs(spec).values())
  return B * (1 if groups == H else groups) * per_call


@pytest.mark.parametrize("topology, causal, groups", [
    ("v5e:2x2", False, H), ("v5p:2x2x1", False, H), ("v6e:2x2", False, H),
    ("v5p:2x2x1", True, H), ("v5p:2x2x1", False, 4)])
def test_splash_forward_and_backward_compile_fit_and_declare_their_cost(topology, causal, groups):
  shapes = [((B, L, H, K), jnp.bfloat16), ((B, L, groups, K), jnp.bfloat16), ((B, L, groups, K), jnp.bfloat16),
            ((B, L), jnp.int32), ((B, L, H, K), jnp.bfloat16)]
  compiled = kernel_aot.compile_on(topology, _fwd_bwd(causal), *shapes, compiler_options=aot.ESTIMATE_OPTIONS)
  text = compiled.as_text()
  assert text.count('custom_call_target="tpu_custom_call"') == 2  # forward, fused backward: Mosaic, no XLA fallback
  chip = target.CHIPS[kernel_aot.chip_of(topology)]
  for name, (used, granted, end) in kernel_aot.kernel_vmem(compiled).items():
    assert 0 < used <= granted and end <= chip.vmem_bytes, (name, used, granted)
  assert kernel_aot.hbm_bytes(compiled) < chip.hbm_bytes
  # XLA counts what the kernels declare plus its own small ops (the q scaling, the backward's
  # rowwise dO.O): within a few percent of the declared work, which a zero-priced kernel is not.
  flops = float(kernel_aot.cost_analysis(compiled)["flops"])
  assert 1.0 <= flops / _declared_flops(causal, groups) < 1.05, flops / _declared_flops(causal, groups)
  # ... and the declared work is what attention is: QK^T and PV forward (4 L^2 H K per row, half
  # of it causal, up to the diagonal tiles), 2.5x that backward (the fused kernel).
  attention = B * 4 * L * L * H * K
  full = 3.5 * attention
  assert np.isclose(_declared_flops(causal, groups), full * ((1 + L // 512) / (2 * L // 512) if causal else 1))


@pytest.mark.slow
def test_model_with_splash_keeps_an_honest_flops_ratio_on_v5p():
  """A dense model whose attention is ~1/5 of its matmul FLOPs (d 512, L 1024), compiled for a
  v5p-8 slice with `auto` attention (splash on TPU), no remat: XLA's FLOPs over the analytic
  count stay in [0.95, 1.4]. Priced at zero, splash would put the ratio near 0.85."""
  cfg = repo_module("demo").get_config("dense")
  m = cfg.model
  m.update(dtype="bfloat16", d_model=512, num_heads=4, num_kv_heads=4, head_dim=128, mlp_dim=1536, num_layers=2,
           remat="none")
  cfg.data.seq_len = 1024
  cfg.train.batch_size = 4
  report = aot.fit_report(cfg, aot.parse_slice("v5p-8"))
  assert report["fits"]
  ratio = report["compiled_flops_per_chip"] / report["analytic_flops_per_chip"]
  assert 0.95 <= ratio <= 1.4, ratio
