"""OpenMoE 2's headline sparse diffusion LM, expert choice, 7.8B total / 1.67B active, and its
ablation arms as variants of this file.

The 1.7B dense backbone with every FFN replaced by 64 routed experts of width 640 plus one
always-on shared expert of width 640; each expert takes floor(N*8/64) tokens of its routing
group (top_k 8: 8 experts per token on average). Per token that is 9 x 640 = 5760 FFN units,
0.94x the dense model's 6144 (0.96x its matmul FLOPs per token), for 4.6x its parameters.
The defaults follow OpenMoE 2's "ec" run: batch-level expert choice (each batch shard routes
its tokens together), softmax gates over the picking experts, shared expert on, no token-wise
balance loss, every layer MoE, no dynamic scaling factor. The seeds do not give the expert
width; 640 (a multiple of 128, for the MXU) is ours, chosen for ~8B total and ~1.7B active.

Variants (the argument; combine with commas, e.g. `tc,smoke`), one per OpenMoE 2 ablation arm.
OpenMoE 2 published the logs and checkpoints of every arm; its stated conclusions are quoted
where it gives one:
  (none)    ec: the reference arm. "Perfect load balancing without auxiliary objectives",
            about 20% more training throughput than token choice, adaptive computation.
  tc        token choice top-8 over the same experts with Switch's balance loss 0.01
            (EC vs TC: EC matches or beats TC at higher throughput).
  lbl       EC plus a token-wise balance loss 0.01 (with vs without)
  noshared  no shared expert; top_k 9 keeps the active FFN width (with vs without)
  e16, e256 expert granularity at the same routed FFN parameters, total and active: 16 experts
            x 2560 (top_k 2) or 256 x 160 (top_k 32), against the default 64 x 640 (top_k 8);
            the shared expert takes the expert width, so active parameters are 2.00B / 1.60B
  skip2     the first 2 layers keep a dense FFN of the backbone's width (skip vs keep)
  seq       sequence-level expert choice: each sequence routes its own tokens (batch vs seq)
  sigmoid   sigmoid router gates instead of softmax
  dynscale  dynamic scaling factors (with vs without; with `tc` too): a token that n experts
            route has its gates multiplied by f[n] = sqrt(n). The seeds do not publish their
            table; ours undoes the 1/sqrt(n) shrink of a sum of n roughly independent expert
            outputs whose gates add up to 1 (under token choice this is a constant sqrt(8))
  ar        the causal AR MoE of the same experts (token choice: EC is not causal)
  upcycle   the expert shape that tiles dense_1b7's FFN for the scratch-vs-upcycled arm: no
            shared expert, 64 experts x 768 = 8 copies of the 6144-wide FFN in 8 shards each
            (top_k 8: the dense FFN's 6144 active units; 9.1B total, 1.74B active). Start it
            from a dense_1b7 run:
              sdlm-upcycle --from RUNS/dense_1b7 --config configs/openmoe2/ec_8b1b7a.py:upcycle --out RUNS/ec_up
            then sdlm-train with --config.train.init_from=RUNS/ec_up/upcycled; train the same
            variant without init_from for the from-scratch side
plus the common options of sdlm_jax/recipes.py (bs<N>, lr<X>, wd0, ep<N>, smoke).

  sdlm-aot --config configs/openmoe2/ec_8b1b7a.py:tc --topology v5p-128
  sdlm-train --config configs/openmoe2/ec_8b1b7a.py:seq --workdir gs://BUCKET/runs/ec_seq ...
"""

from sdlm_jax import recipes


def _granularity(num_experts: int):
  def apply(c):
    moe = c.model.moe
    scale = num_experts / moe.num_experts
    moe.expert_mlp_dim = int(moe.expert_mlp_dim / scale)
    moe.top_k = int(moe.top_k * scale)
    moe.num_experts = num_experts
  return apply


def _no_shared(c):
  c.model.moe.num_shared_experts = 0
  c.model.moe.top_k += 1


def _upcycle_shape(c):
  c.model.moe.num_shared_experts = 0
  c.model.moe.expert_mlp_dim = c.model.mlp_dim // 8


def _dynamic_scaling(c):
  c.model.moe.dynamic_scaling_factors = tuple(float(n) ** 0.5 for n in range(c.model.moe.num_experts + 1))


VARIANTS = {
    "tc": recipes.to_token_choice,
    "lbl": lambda c: setattr(c.model.moe, "load_balance_weight", 0.01),
    "noshared": _no_shared,
    "e16": _granularity(16),
    "e256": _granularity(256),
    "skip2": lambda c: setattr(c.model.moe, "first_k_dense", 2),
    "seq": lambda c: setattr(c.model.moe, "ec_group", "sequence"),
    "sigmoid": lambda c: setattr(c.model.moe, "router_activation", "sigmoid"),
    "dynscale": _dynamic_scaling,
    "upcycle": _upcycle_shape,
}


def get_config(arg: str = ""):
  c = recipes.dense_1b7()
  moe = c.model.moe
  moe.num_experts = 64
  moe.expert_mlp_dim = 640
  moe.top_k = 8
  moe.router = "expert_choice"
  moe.ec_group = "batch"
  moe.router_activation = "softmax"
  moe.num_shared_experts = 1
  moe.first_k_dense = 0
  moe.load_balance_weight = 0.0
  moe.z_loss_weight = 0.0
  # benchmarks/remat_policies.py on v5p-128 at batch 256: 18.0 GiB per chip, 0.421 s
  # (minimal_with_context: 0.424 s at 16.6 GiB); none was 0.390 s at 53.5 GiB, over a quarter of
  # the HBM (README, "Splash attention and remat policies").
  c.model.remat = "minimal_with_context_and_rope"
  return recipes.finish(c, arg, VARIANTS)
