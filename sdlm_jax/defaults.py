"""Shared defaults for every sdlm_jax config.

Every config file (configs/*.py, loaded by path) starts from `get_base_config()` and
overrides only what differs; a default lives here and nowhere else. Run directories written
before a field existed are completed from here too (sdlm_jax.workdir). The meaning of each field is documented
next to it. `sdlm_jax.config.validate` checks the whole tree at start-up and names any
bad field together with the values it accepts.
"""

import ml_collections


def get_base_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seed = 0

  # ---------------------------------------------------------------- model
  m = c.model = ml_collections.ConfigDict()
  m.vocab_size = 4096          # tokenizer is trained with exactly this many pieces
  m.num_layers = 4
  m.d_model = 256
  m.num_heads = 4
  m.num_kv_heads = 4           # grouped-query attention when < num_heads
  m.head_dim = 64
  m.mlp_dim = 1024             # hidden width of dense SwiGLU FFNs
  m.causal = False             # False: bidirectional (diffusion); True: AR baseline
  m.time_embedding = False     # True: the model takes the diffusion time t (needed by diffusion.kernel=uniform)
  m.qk_norm = True
  m.tie_embeddings = False
  m.rope_theta = 10_000.0
  m.norm_eps = 1e-6
  m.init_std = 0.02
  m.dtype = "bfloat16"         # compute dtype; params are kept in param_dtype
  m.param_dtype = "float32"
  m.attention = "auto"         # auto (TPU: splash, GPU: cudnn for bf16/f16, else xla) | xla | cudnn | splash | splash_interpret
  m.scan_layers = True         # stack each run of identical layers under one nnx.scan (compile time flat in depth)
  m.remat = "full"             # what a block keeps for backward (sdlm_jax/model/transformer.py REMAT_POLICIES):
                               # none | full | minimal | minimal_with_context | minimal_with_context_and_rope |
                               # save_dot_except_mlp | save_qkv_proj | save_dots | save_dots_no_batch | offload

  moe = m.moe = ml_collections.ConfigDict()
  moe.num_experts = 0          # 0: every layer uses a dense FFN
  moe.expert_mlp_dim = 256
  moe.router = "expert_choice"  # expert_choice | token_choice
  moe.top_k = 2                # TC: experts per token; EC: average experts per token (capacity factor)
  moe.ec_group = "sequence"    # EC routing group: sequence | batch
  moe.router_activation = "softmax"  # softmax | sigmoid
  moe.num_shared_experts = 0   # always-on SwiGLU experts, each expert_mlp_dim wide
  moe.first_k_dense = 0        # the first k layers keep a dense FFN
  moe.load_balance_weight = 0.0  # TC: Switch aux loss; EC: token-wise balance loss
  moe.z_loss_weight = 0.0      # router z-loss (both routers)
  moe.routed_scaling_factor = 1.0
  moe.dynamic_scaling_factors = ()  # () off; E+1 numbers: gates of a token with n experts x entry n (TC: entry k)
  moe.bias_update_rate = 0.0   # TC aux-loss-free balancing: >0 adds a selection-only expert bias moved this much per step
  moe.backend = "auto"         # MoE kernels: auto | pallas | xla | interpret (EC: pallas/interpret = ec_ffn kernel)

  # ---------------------------------------------------------------- diffusion objective
  d = c.diffusion = ml_collections.ConfigDict()
  d.loss = "megadlm"           # megadlm | maskgit | mdlm_elbo | ar (ar requires model.causal=True)
  d.kernel = "masked"          # masked ([MASK] absorbing state) | uniform (random tokens; loss=mdlm_elbo, model.time_embedding)
  d.schedule = "linear"        # masking schedule alpha(t): linear | poly2 | cosine (every diffusion loss)
  d.t_min = 1e-3               # smallest t the MDLM ELBO samples
  d.t_sampling = "uniform"     # uniform | moving_gaussian (t window centred at step/num_steps, clean to noisy)
  d.moving_gaussian_std = 0.25  # width of the moving-Gaussian t window (before truncation to [0, 1])
  d.random_length_prob = 0.01  # MegaDLMs: chance a batch is cut to a random length
  d.num_t_buckets = 4          # loss is also reported per t-bucket

  # ---------------------------------------------------------------- data
  data = c.data = ml_collections.ConfigDict()
  data.source = "shakespeare"  # shakespeare | text_files | array_record | prepared
  data.paths = ""              # comma-separated globs for text_files / array_record; the directory for prepared
  data.data_dir = "data_cache"  # tokenizer and ArrayRecord shards are cached here
  data.seq_len = 128
  data.val_fraction = 0.05     # share of documents held out for validation
  data.num_epochs = -1         # -1: repeat forever
  data.shuffle = True
  data.tokenizer_sample_chars = 4_000_000  # characters the tokenizer is trained on
  # prepared source (data.paths = a directory written by sdlm-prepare, local or gs://):
  data.unique_tokens = 0       # >0: train on a seed-chosen subset of this many train tokens, repeated (epochs)
  data.shuffle_window = 0      # 0: global shuffle; W: shuffle windows of W documents, then inside each

  # ---------------------------------------------------------------- training
  t = c.train = ml_collections.ConfigDict()
  t.batch_size = 32            # global batch, in sequences
  t.grad_accum_steps = 1
  t.num_steps = 1000
  t.log_every = 10
  t.checkpoint_every = 200
  t.keep_checkpoints = 3
  t.eval_every = 0             # 0: evaluate only at the end
  t.init_from = ""             # a new run starts from this export directory's weights (sdlm-export, sdlm-upcycle)

  o = t.optimizer = ml_collections.ConfigDict()
  o.lr = 2e-4
  o.schedule = "cosine"        # cosine | wsd | constant
  o.warmup_steps = 100
  o.decay_fraction = 0.2       # wsd: share of steps spent decaying
  o.min_lr_ratio = 0.1
  o.b1 = 0.9
  o.b2 = 0.95
  o.eps = 1e-8
  o.weight_decay = 0.1         # never applied to norms and biases
  o.clip_norm = 1.0            # global-norm gradient clipping (0: no clipping)

  # ---------------------------------------------------------------- evaluation
  e = c.eval = ml_collections.ConfigDict()
  e.num_batches = 8            # validation batches for the ELBO bound
  e.num_t_samples = 4          # antithetic t samples per sequence
  e.seed = 1234
  e.every_epochs = 0           # >0: also evaluate each time training passes this many epochs of its data

  # ---------------------------------------------------------------- sampling defaults
  s = c.sample = ml_collections.ConfigDict()
  s.length = 64
  s.steps = 64
  s.block_size = 0             # 0: one block (no semi-autoregressive decoding)
  s.temperature = 0.0          # 0: greedy
  s.top_p = 1.0
  s.remasking = "low_confidence"  # low_confidence | random
  s.cfg_scale = 0.0            # classifier-free guidance (0: off)

  # ---------------------------------------------------------------- device mesh
  # Sizes inside one slice (ICI) and across slices (DCN, multi-slice TPU jobs); an axis spans
  # ICI x DCN devices. One -1 per group fills the slice's devices / the number of slices.
  mesh = c.mesh = ml_collections.ConfigDict()
  mesh.data = -1               # -1: all remaining devices of a slice
  mesh.fsdp = 1
  mesh.expert = 1
  mesh.model = 1
  mesh.dcn_data = -1           # -1: one data-parallel group per slice (1 on a single slice)
  mesh.dcn_fsdp = 1
  mesh.dcn_expert = 1
  mesh.dcn_model = 1
  mesh.rules = "default"        # logical-axis rule set (sdlm_jax/parallel/rules.py): default | data
  return c
