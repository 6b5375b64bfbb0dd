"""Demo: a tiny expert-choice MoE diffusion LM on the embedded Shakespeare corpus.

Command (2 CPU cores: ~8 minutes including tokenizer training and evaluation):
  sdlm-train --config configs/demo.py --workdir runs/demo
  sdlm-generate --workdir runs/demo --prompt "KING HENRY." --prompt "To be, or not to be"

Expected result (800 steps of 16 x 128 tokens, 1.6M tokens, 0.9 epochs): validation ELBO
perplexity bound ~127 against ~410 for a unigram model of the same split, and samples in the
shape of a play (speaker names, stage directions) mixing English words and invented names.

The argument picks a variant with the same active FLOPs per token, and `smoke` shrinks any
of them for a CPU test in seconds:
  configs/demo.py          expert choice (8 experts x 256, top_k 2, one shared expert)
  configs/demo.py:tc       token choice top-2 with the same experts
  configs/demo.py:dense    dense FFN of width 768 (= 2 x 256 routed + 256 shared)
  configs/demo.py:ar       the dense model as a causal AR baseline
  configs/demo.py:ec,smoke a few steps of a very small model
"""

from sdlm_jax.defaults import get_base_config

VARIANTS = ("ec", "tc", "dense", "ar")


def get_config(arg: str = "ec"):
  options = [a for a in arg.split(",") if a]
  variant = next((a for a in options if a in VARIANTS), "ec")
  unknown = set(options) - set(VARIANTS) - {"smoke"}
  if unknown:
    raise ValueError(f"configs/demo.py: unknown argument(s) {sorted(unknown)}; allowed: {VARIANTS + ('smoke',)}")

  c = get_base_config()
  c.model.vocab_size = 2048
  c.model.num_layers = 4
  c.model.d_model = 256
  c.model.num_heads = 4
  c.model.num_kv_heads = 2
  c.model.head_dim = 64
  c.model.mlp_dim = 768
  c.model.dtype = "float32"  # CPU matmuls are fastest in f32; TPU configs use bfloat16
  c.model.tie_embeddings = True
  c.model.remat = "none"     # a small model: activations fit, recomputing them only costs time
  c.model.scan_layers = False  # 4 layers compile fast unrolled, and run ~15% faster on CPU than scanned

  c.model.moe.num_experts = 8
  c.model.moe.expert_mlp_dim = 256
  c.model.moe.top_k = 2
  c.model.moe.num_shared_experts = 1
  c.model.moe.ec_group = "sequence"
  c.model.moe.router = "expert_choice"
  if variant == "tc":
    c.model.moe.router = "token_choice"
    c.model.moe.load_balance_weight = 0.01
  elif variant in ("dense", "ar"):
    c.model.moe.num_experts = 0
  if variant == "ar":
    c.model.causal = True
    c.diffusion.loss = "ar"

  c.data.seq_len = 128
  c.train.batch_size = 16
  c.train.num_steps = 800
  c.train.log_every = 25
  c.train.checkpoint_every = 200
  c.train.optimizer.lr = 3e-3
  c.train.optimizer.warmup_steps = 50
  c.train.optimizer.schedule = "wsd"
  c.eval.num_batches = 8

  c.sample.length = 48
  c.sample.steps = 48
  c.sample.block_size = 8      # semi-autoregressive blocks keep a tiny model's samples coherent
  c.sample.temperature = 1.0
  c.sample.top_p = 0.9

  if "smoke" in options:
    c.model.vocab_size = 512
    c.model.num_layers = 2
    c.model.scan_layers = True  # the tests built on smoke runs cover the scanned stacks the TPU configs use
    c.model.d_model = 64
    c.model.num_heads = 2
    c.model.num_kv_heads = 1
    c.model.head_dim = 32
    c.model.mlp_dim = 192
    c.model.moe.expert_mlp_dim = 64
    c.model.moe.num_experts = 4 if c.model.moe.num_experts else 0
    c.data.seq_len = 32
    c.data.tokenizer_sample_chars = 300_000
    c.train.batch_size = 8
    c.train.num_steps = 6
    c.train.log_every = 1
    c.train.checkpoint_every = 3
    c.train.optimizer.warmup_steps = 2
    c.eval.num_batches = 2
    c.eval.num_t_samples = 2
    c.sample.length = 8
    c.sample.steps = 4
  return c
