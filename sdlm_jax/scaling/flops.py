"""Analytic parameter and FLOPs accounting of exactly what the model computes.

Counts matmul FLOPs only (2 per multiply-add): attention projections, attention scores and
values, dense FFNs, the router, the routed and shared experts, and the LM head. Norms,
softmaxes, RoPE and the embedding gather are left out, so XLA's count of the compiled model
comes out a few percent above this and never far above it.

Expert choice processes E*C = E*floor(N*k/E) <= N*k (token, expert) pairs per group of N
tokens, so its expert work per token is at most top_k experts' worth, like token choice.
Token choice on CPU runs the XLA reference of `pallas_kernels.gmm`, which does more matmul
work than the N*k routed rows need (row tiles padded per expert; `lax.ragged_dot`, where used,
is computed and costed as dense over all E experts, E times the expert FLOPs). That is CPU
overhead, not what the model asks for: the analytic count is the target for the TPU/GPU kernels.
"""

from sdlm_jax.model.stacks import is_moe_layer


def _attention_params(m) -> int:
  return m.d_model * m.head_dim * (2 * m.num_heads + 2 * m.num_kv_heads)


def _norm_params(m) -> int:
  per_layer = 2 * m.d_model + (2 * m.head_dim if m.qk_norm else 0)
  return m.num_layers * per_layer + m.d_model


def _ffn_params(m, moe_layer: bool, experts_used) -> int:
  """FFN weights of one layer with `experts_used` routed experts (None: all of them)."""
  if not moe_layer:
    return 3 * m.d_model * m.mlp_dim
  moe = m.moe
  expert = 3 * m.d_model * moe.expert_mlp_dim
  routed = expert * (moe.num_experts if experts_used is None else experts_used)
  bias = moe.num_experts if moe.router == "token_choice" and moe.get("bias_update_rate", 0.0) > 0 else 0
  return m.d_model * moe.num_experts + bias + routed + expert * moe.num_shared_experts


def param_counts(m) -> dict:
  """Parameter counts of a `config.model`.

  total: every parameter. active: what one token uses, i.e. total less the routed experts it
  does not use (top_k of them are used; for expert choice top_k is the average). embedding:
  the input table (vocab * d_model), included in both; subtract it for non-embedding counts.
  """
  embedding = m.vocab_size * m.d_model
  time_mlp = 2 * m.d_model * m.d_model if m.get("time_embedding", False) else 0  # once per row: no FLOPs per token
  shared = embedding + (0 if m.tie_embeddings else embedding) + _norm_params(m) + time_mlp
  total, active = shared, shared
  for layer in range(m.num_layers):
    moe_layer = is_moe_layer(m, layer)
    total += _attention_params(m) + _ffn_params(m, moe_layer, None)
    active += _attention_params(m) + _ffn_params(m, moe_layer, m.moe.top_k)
  return {"total": total, "active": active, "embedding": embedding}


def flops_per_token(m, seq_len: int, training: bool = True) -> float:
  """Matmul FLOPs per token: 2 x matmul params used + 4 * L * heads * head_dim per layer (QK^T
  and AV over the whole row; the causal model computes the masked half too); x3 for training
  (forward + backward)."""
  matmul_params = m.vocab_size * m.d_model  # the LM head, tied or not
  for layer in range(m.num_layers):
    matmul_params += _attention_params(m) + _ffn_params(m, is_moe_layer(m, layer), m.moe.top_k)
  attention = m.num_layers * 4 * seq_len * m.num_heads * m.head_dim
  forward = 2 * matmul_params + attention
  return 3.0 * forward if training else float(forward)
