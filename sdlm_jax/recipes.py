"""The training setup the OpenMoE 2 / Quokka seed models share (docs/figures.md), and their
dense 1.7B backbone. The config files under configs/openmoe2/ build on it and change only the FFN.

Setup: sequence 2048, global batch 256 x 2048 tokens (0.5M), 100B tokens (190,735 steps),
AdamW b=(0.9, 0.95), weight decay 0.1, clip 1.0, lr 2e-4, WSD schedule (2000 warmup steps,
decay over the last 10%), init std 0.02, bf16 compute with float32 params, MegaDLMs' loss,
scanned layers with full remat, pure FSDP inside a slice and data parallelism across slices.

Data: the embedded corpus is only a placeholder here; a real run points the config at its
own corpus, e.g. --config.data.source=array_record --config.data.paths='/data/web/*.arrayrecord'.

Every seed config file takes an argument of comma-separated options (`finish`): its own named
variants (the ablation arms) and the common ones: `ar` (the causal next-token baseline of the
same model), `bs<N>` (global batch N at the same token budget), `lr<X>`, `wd0` (weight decay
off), `ep<N>` (the same tokens as N epochs of a prepared corpus's unique-token subset), and `smoke`, which shrinks any of them to a CPU run of a few seconds that exercises the
same code path (same routers, same loss, scanned and rematerialised layers).
"""

import re

from sdlm_jax.defaults import get_base_config

TOKENS = 100_000_000_000
SEQ_LEN = 2048
GLOBAL_BATCH = 256


def dense_1b7():
  """MegaDLMs' 1.7B dense DLM: 28 layers, d 2048, 16 heads, SwiGLU 6144, vocab 50289."""
  c = get_base_config()
  m = c.model
  m.vocab_size = 50289
  m.num_layers = 28
  m.d_model = 2048
  m.num_heads = 16
  m.num_kv_heads = 16
  m.head_dim = 128
  m.mlp_dim = 6144
  m.qk_norm = True
  m.tie_embeddings = False
  m.rope_theta = 10_000.0
  m.norm_eps = 1e-6
  m.init_std = 0.02
  m.dtype = "bfloat16"
  m.param_dtype = "float32"
  m.scan_layers = True
  m.remat = "full"

  c.data.seq_len = SEQ_LEN
  c.data.tokenizer_sample_chars = 20_000_000
  t = c.train
  t.batch_size = GLOBAL_BATCH
  t.num_steps = TOKENS // (GLOBAL_BATCH * SEQ_LEN)
  t.log_every = 50
  t.checkpoint_every = 2000
  t.eval_every = 10_000
  o = t.optimizer
  o.lr = 2e-4
  o.schedule = "wsd"
  o.warmup_steps = 2000
  o.decay_fraction = 0.1
  o.weight_decay = 0.1
  o.clip_norm = 1.0

  c.mesh.data = 1
  c.mesh.fsdp = -1
  c.mesh.dcn_data = -1
  return c


def dense_8b_shape(m):
  """The 8B dense model's shape on a dense_1b7 model section: 32 layers, d 4096, 32 heads x 128,
  SwiGLU 14336 (vocab 50289, untied: 8.19B parameters); the common 8B shape, as the seeds give none."""
  m.num_layers, m.d_model, m.num_heads, m.num_kv_heads, m.head_dim = 32, 4096, 32, 32, 128
  m.mlp_dim = 14336
  m.vocab_size, m.tie_embeddings = 50289, False
  return m


def gpt2_1b():
  """Quokka's 1B "gpt2" DLM: 26 layers, d 1792, 14 heads x 128, SwiGLU 4736, vocab 50269, tied
  embeddings; the seeds' shared training setup otherwise (dense_1b7's), 96B tokens in one epoch."""
  c = dense_1b7()
  m = c.model
  m.vocab_size = 50269
  m.num_layers = 26
  m.d_model = 1792
  m.num_heads = 14
  m.num_kv_heads = 14
  m.head_dim = 128
  m.mlp_dim = 4736
  m.tie_embeddings = True
  set_tokens(c, 96_000_000_000)
  return c


def set_tokens(c, tokens: int):
  """Trains on `tokens` tokens at the config's batch and sequence length."""
  c.train.num_steps = max(1, tokens // (c.train.batch_size * c.data.seq_len))
  return c


def shrink(c):
  """A few CPU seconds of the same code path: tiny widths, few layers and steps."""
  m = c.model
  m.vocab_size = 512
  m.num_layers = 2
  m.d_model = 64
  m.num_heads = 2
  m.num_kv_heads = 2
  m.head_dim = 32
  m.mlp_dim = 192 if not m.moe.num_experts else m.mlp_dim
  m.dtype = "float32"
  if m.moe.num_experts:
    m.moe.num_experts = 8
    m.moe.expert_mlp_dim = 32
    m.moe.top_k = 2
    if m.moe.dynamic_scaling_factors:  # a table f[n] over expert counts: its first E+1 entries
      m.moe.dynamic_scaling_factors = tuple(m.moe.dynamic_scaling_factors[:m.moe.num_experts + 1])
  c.data.seq_len = 64
  c.data.tokenizer_sample_chars = 300_000
  c.train.batch_size = 8
  c.train.num_steps = 4
  c.train.log_every = 1
  c.train.checkpoint_every = 2
  c.train.eval_every = 0
  c.train.optimizer.warmup_steps = 1
  c.eval.num_batches = 1
  c.eval.num_t_samples = 1
  c.mesh.fsdp = 1
  c.mesh.data = -1
  if c.data.unique_tokens:
    c.data.unique_tokens = 2_000  # a few documents of the prepared corpus, repeated
  return c


def make_ar(c):
  """The AR baseline of a config: causal attention, next-token loss (expert choice routes over the
  whole sequence, which would let a token see later ones, so an MoE AR model uses token choice)."""
  c.model.causal = True
  c.diffusion.loss = "ar"
  if c.model.moe.num_experts and c.model.moe.router == "expert_choice":
    to_token_choice(c)
  return c


def to_token_choice(c, load_balance_weight: float = 0.01):
  """Token choice top-k over the same experts (same active FLOPs), with Switch's balance loss."""
  c.model.moe.router = "token_choice"
  c.model.moe.load_balance_weight = load_balance_weight
  return c


def set_global_batch(c, batch: int):
  """`batch` sequences per step, the step count scaled to keep the token budget."""
  tokens = c.train.num_steps * c.train.batch_size
  c.train.batch_size = batch
  c.train.num_steps = max(1, tokens // batch)
  return c


# Options every seed config takes in its argument (comma-separated with its own variants):
# `ar`, `bs<N>` (global batch, same tokens), `lr<X>`, `wd0` (no weight decay), `ep<N>` (the same
# tokens as N epochs of a unique-token subset), `smoke`.
COMMON_OPTIONS = ("ar", "bs<N>", "lr<X>", "wd0", "ep<N>", "smoke")


def repeat_data(c, epochs: int):
  """The same training tokens drawn from 1/epochs as many unique tokens, repeated `epochs` times:
  the data-constrained runs. Needs a prepared corpus (`--config.data.paths=DIR` of sdlm-prepare)."""
  c.data.source = "prepared"
  c.data.unique_tokens = max(1, c.train.num_steps * c.train.batch_size * c.data.seq_len // epochs)
  return c


def _common_option(c, word: str) -> bool:
  """Applies one common option to `c`; False if `word` is not one."""
  if word == "ar":
    make_ar(c)
  elif word == "wd0":
    c.train.optimizer.weight_decay = 0.0
  elif re.fullmatch(r"bs[1-9][0-9]*", word):
    set_global_batch(c, int(word[2:]))
  elif re.fullmatch(r"lr[0-9.]+(e-?[0-9]+)?", word):
    c.train.optimizer.lr = float(word[2:])
  elif re.fullmatch(r"ep[1-9][0-9]*", word):
    repeat_data(c, int(word[2:]))
  elif word != "smoke":
    return False
  return True


def finish(c, arg: str, variants: dict | None = None):
  """Applies the config file's argument: its own named `variants` (name -> function(c)) and
  the common options, in the order given; `smoke` (anywhere) shrinks the result last."""
  variants = variants or {}
  options = [a for a in (arg or "").split(",") if a]
  for word in options:
    if word in variants:
      variants[word](c)
    elif not _common_option(c, word):
      allowed = ", ".join(list(variants) + list(COMMON_OPTIONS))
      raise ValueError(f"unknown config argument {word!r}; allowed: {allowed}")
  return shrink(c) if "smoke" in options else c
