"""The training setup the OpenMoE 2 / Quokka seed models share (docs/figures.md), and their
dense 1.7B backbone. The files beside this one change only the FFN.

Setup: sequence 2048, global batch 256 x 2048 tokens (0.5M), 100B tokens (190,735 steps),
AdamW b=(0.9, 0.95), weight decay 0.1, clip 1.0, lr 2e-4, WSD schedule (2000 warmup steps,
decay over the last 10%), init std 0.02, bf16 compute with float32 params, MegaDLMs' loss,
scanned layers with full remat, pure FSDP inside a slice and data parallelism across slices.

Data: the embedded corpus is only a placeholder here; a real run points the config at its
own corpus, e.g. --config.data.source=array_record --config.data.paths='/data/web/*.arrayrecord'.

The argument `smoke` shrinks any of these configs to a CPU run of a few seconds that
exercises the same code path (same routers, same loss, scanned and rematerialised layers).
"""

from configs.base import get_base_config

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
  return c


def finish(c, arg: str):
  options = [a for a in (arg or "").split(",") if a]
  unknown = set(options) - {"smoke"}
  if unknown:
    raise ValueError(f"unknown config argument(s) {sorted(unknown)}; allowed: smoke")
  return shrink(c) if "smoke" in options else c
