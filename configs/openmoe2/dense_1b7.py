"""OpenMoE 2's 1.7B dense diffusion LM (the FLOPs match of the 8B-total EC MoE).

28 layers, d 2048, 16 heads x 128, SwiGLU 6144, vocab 50289, untied: 1.73B parameters.
Training setup in sdlm_jax/recipes.py (100B tokens at 256 x 2048 per step).

Fit check and step-time estimate on a CPU host (see README, "AOT fit check"):
  sdlm-aot --config configs/openmoe2/dense_1b7.py --topology v5p-128
Train on a TPU slice (launch/tpu/tpu.sh runs this on every worker):
  sdlm-train --distributed --config configs/openmoe2/dense_1b7.py --workdir /mnt/runs/dense_1b7 \\
      --config.data.source=array_record --config.data.paths='/data/corpus/*.arrayrecord'
"""

from sdlm_jax import recipes


def get_config(arg: str = ""):
  c = recipes.dense_1b7()
  # Chosen with benchmarks/remat_policies.py on v5p-128 at batch 256 (README, "Splash attention
  # and remat policies"): the fastest policy within a quarter of the chip's HBM (17.1 GiB, 0.302 s;
  # minimal_with_context: 0.308 s at 15.4 GiB; none: 0.298 s at 40.8 GiB).
  c.model.remat = "minimal_with_context_and_rope"
  return recipes.finish(c, arg)
