"""Analytic parameter and FLOPs accounting of exactly what the model computes.

Counts matmul FLOPs only (2 per multiply-add); norms, softmaxes and the embedding gather are
left out, so XLA's compiled count should come out a few percent above this and never far
above it. Expert choice processes E*C = N*k (token, expert) pairs per group, so its expert
work per token is top_k experts' worth, like token choice.
"""


def _attention_params(m) -> int:
  return m.d_model * m.head_dim * (2 * m.num_heads + 2 * m.num_kv_heads)


def _ffn_params(m, moe_layer: bool, active: bool) -> int:
  if not moe_layer:
    return 3 * m.d_model * m.mlp_dim
  moe = m.moe
  experts = moe.top_k if active else moe.num_experts
  routed = 3 * m.d_model * moe.expert_mlp_dim * experts
  shared = 3 * m.d_model * moe.expert_mlp_dim * moe.num_shared_experts
  return m.d_model * moe.num_experts + routed + shared


def _is_moe(m, layer: int) -> bool:
  return m.moe.num_experts > 0 and layer >= m.moe.first_k_dense


def param_counts(m) -> dict:
  """total, active (per token, excluding the embedding table) and embedding parameters."""
  norms = m.d_model * (2 * m.num_layers + 1) + (2 * m.head_dim * m.num_layers if m.qk_norm else 0)
  embedding = m.vocab_size * m.d_model
  head = 0 if m.tie_embeddings else embedding
  total = embedding + head + norms
  active = head + norms
  for layer in range(m.num_layers):
    total += _attention_params(m) + _ffn_params(m, _is_moe(m, layer), active=False)
    active += _attention_params(m) + _ffn_params(m, _is_moe(m, layer), active=True)
  return {"total": total, "active": active, "embedding": embedding}


def flops_per_token(m, seq_len: int, training: bool = True) -> float:
  """Matmul FLOPs per token: projections, experts, router, attention scores/values, LM head."""
  matmul_params = m.vocab_size * m.d_model  # LM head (tied or not, it is one matmul)
  for layer in range(m.num_layers):
    matmul_params += _attention_params(m) + _ffn_params(m, _is_moe(m, layer), active=True)
  attention = m.num_layers * 4 * seq_len * m.num_heads * m.head_dim  # QK^T and AV
  forward = 2 * matmul_params + attention
  return 3.0 * forward if training else float(forward)
