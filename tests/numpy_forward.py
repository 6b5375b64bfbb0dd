"""An independent NumPy reference of an exported model's forward pass, in float64 loops.

It reads only what the export format documents: config.json's `model` section and the
safetensors files, which it parses itself from the format's definition (an 8-byte
little-endian header length, a JSON header of name -> dtype, shape and byte offsets, then raw
little-endian data; BF16 is the top half of a float32). The maths follows the model's
definition (README: Export), not sdlm_jax's code, so agreeing with it shows the files and
their documentation are enough to run the model.
"""

import json
import os
import struct

import numpy as np

_NUMPY_DTYPES = {"F64": "<f8", "F32": "<f4", "F16": "<f2"}
_PAD_SCORE = -1e9  # expert-choice selection score of a padding token: below any real logit


def read_safetensors(path) -> dict:
  """{name: float64 array} of one safetensors file."""
  with open(path, "rb") as f:
    data = f.read()
  (header_len,) = struct.unpack("<Q", data[:8])
  header = json.loads(data[8:8 + header_len])
  body = data[8 + header_len:]
  out = {}
  for name, info in header.items():
    if name == "__metadata__":
      continue
    start, end = info["data_offsets"]
    raw = body[start:end]
    if info["dtype"] == "BF16":
      values = (np.frombuffer(raw, "<u2").astype(np.uint32) << 16).view(np.float32)
    else:
      values = np.frombuffer(raw, _NUMPY_DTYPES[info["dtype"]])
    out[name] = values.reshape(info["shape"]).astype(np.float64)
  return out


def read_weights(export_dir) -> dict:
  """Every tensor of the export: the shards its index names, or model.safetensors."""
  index = os.path.join(export_dir, "model.safetensors.index.json")
  if os.path.exists(index):
    with open(index) as f:
      files = sorted(set(json.load(f)["weight_map"].values()))
  else:
    files = ["model.safetensors"]
  weights = {}
  for name in files:
    weights.update(read_safetensors(os.path.join(export_dir, name)))
  return weights


def rms_norm(x, scale, eps):
  return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * scale


def rope(x_LxHxK, positions_L, theta):
  """Rotary embedding, split-half convention: pairs (i, i + K/2) rotate by position * theta^(-i/(K/2))."""
  half = x_LxHxK.shape[-1] // 2
  angles_LxK2 = positions_L[:, None] * theta ** (-np.arange(half) / half)
  cos, sin = np.cos(angles_LxK2)[:, None, :], np.sin(angles_LxK2)[:, None, :]
  x1, x2 = x_LxHxK[..., :half], x_LxHxK[..., half:]
  return np.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)


def silu(x):
  return x / (1.0 + np.exp(-x))


def swiglu(h_ND, w_gate, w_up, w_down):
  return (silu(h_ND @ w_gate) * (h_ND @ w_up)) @ w_down


def softmax(x):
  e = np.exp(x - np.max(x))
  return e / np.sum(e)


def attention(h_LxD, w, prefix, segment_ids_L, positions_L, m):
  """One row's self-attention: query head h reads key/value head h // (H / G); a query sees the
  keys of its own segment (and, causal, not after itself); scores scaled by 1/sqrt(K)."""
  q = np.einsum("ld,dhk->lhk", h_LxD, w[prefix + "wq"])
  k = np.einsum("ld,dgk->lgk", h_LxD, w[prefix + "wk"])
  v = np.einsum("ld,dgk->lgk", h_LxD, w[prefix + "wv"])
  if m["qk_norm"]:
    q = rms_norm(q, w[prefix + "q_norm.scale"], m["norm_eps"])
    k = rms_norm(k, w[prefix + "k_norm.scale"], m["norm_eps"])
  q, k = rope(q, positions_L, m["rope_theta"]), rope(k, positions_L, m["rope_theta"])
  length, heads, head_dim = q.shape
  per_group = heads // k.shape[1]
  out = np.zeros_like(q)
  for h in range(heads):
    g = h // per_group
    for i in range(length):
      keys = [j for j in range(length)
              if segment_ids_L[j] == segment_ids_L[i] and (not m["causal"] or j <= i)]
      p = softmax(np.array([q[i, h] @ k[j, g] for j in keys]) / np.sqrt(head_dim))
      out[i, h] = sum(pj * v[j, g] for pj, j in zip(p, keys))
  return np.einsum("lhk,hkd->ld", out, w[prefix + "wo"])


def _gates(logits, activation):
  """Normalised weights of the chosen experts' logits (softmax, or sigmoids summing to 1)."""
  if activation == "softmax":
    return softmax(logits)
  s = 1.0 / (1.0 + np.exp(-logits))
  return s / np.sum(s)


def moe(h_BxLxD, w, prefix, token_mask_BxL, m):
  """The MoE FFN on one device. Expert choice: in each routing group (a sequence, or the whole
  batch with ec_group=batch) expert e takes its C = min(floor(N k / E), N) highest-logit tokens
  (padding scores below every real token; ties: lower index), and a token's gates are
  normalised over the experts that took it. Token choice: each token's top-k experts by router
  probability plus the selection bias if any (ties: lower index), gates the unbiased
  probabilities normalised over those k. Gates of a token with n experts times
  dynamic_scaling_factors[n] when given. Routed output scaled by routed_scaling_factor, shared
  experts added, padding tokens zeroed."""
  cfg = m["moe"]
  batch, length, d = h_BxLxD.shape
  h_ND = h_BxLxD.reshape(-1, d)
  mask_N = token_mask_BxL.reshape(-1)
  logits_NxE = h_ND @ w[prefix + "router"]
  num_experts, k = logits_NxE.shape[1], cfg["top_k"]
  expert = lambda e, x: swiglu(x, w[prefix + "w_gate"][e], w[prefix + "w_up"][e], w[prefix + "w_down"][e])
  routed_ND = np.zeros_like(h_ND)
  factors = cfg.get("dynamic_scaling_factors") or [1.0] * (num_experts + 1)
  bias_E = w.get(prefix + "selection_bias", np.zeros(num_experts))
  if cfg["router"] == "expert_choice":
    if cfg["ec_group"] == "sequence":
      groups = [list(range(b * length, (b + 1) * length)) for b in range(batch)]
    else:
      groups = [list(range(batch * length))]
    for group in groups:
      capacity = min(len(group) * k // num_experts, len(group))
      chosen = {n: [] for n in group}
      for e in range(num_experts):
        score = {n: logits_NxE[n, e] if mask_N[n] else _PAD_SCORE for n in group}
        for n in sorted(group, key=lambda n: (-score[n], n))[:capacity]:
          if mask_N[n]:
            chosen[n].append(e)
      for n, experts in chosen.items():
        if experts:
          gates = _gates(logits_NxE[n, experts], cfg["router_activation"]) * factors[len(experts)]
          routed_ND[n] = sum(g * expert(e, h_ND[n]) for g, e in zip(gates, experts))
  else:
    for n in range(h_ND.shape[0]):
      if cfg["router_activation"] == "softmax":
        probs = softmax(logits_NxE[n])
      else:
        probs = 1.0 / (1.0 + np.exp(-logits_NxE[n]))
      top = sorted(range(num_experts), key=lambda e: (-(probs[e] + bias_E[e]), e))[:k]
      gates = probs[top] / np.sum(probs[top]) * factors[k]
      if mask_N[n]:
        routed_ND[n] = sum(g * expert(e, h_ND[n]) for g, e in zip(gates, top))
  y_ND = routed_ND * cfg["routed_scaling_factor"]
  if cfg["num_shared_experts"]:
    y_ND = y_ND + swiglu(h_ND, w[prefix + "shared.w_gate"], w[prefix + "shared.w_up"], w[prefix + "shared.w_down"])
  y_ND[~mask_N] = 0.0
  return y_ND.reshape(batch, length, d)


def time_embedding(t_B, w, d):
  """MLP(sinusoidal(1000 t)) with d/2 frequencies 10000^(-i/(d/2)): cos features, then sin."""
  half = d // 2
  angle = 1000.0 * np.asarray(t_B, np.float64)[:, None] * np.exp(-np.log(10_000.0) * np.arange(half) / half)[None]
  feats = np.concatenate([np.cos(angle), np.sin(angle)], axis=-1)
  return silu(feats @ w["time_in"]) @ w["time_out"]


def forward(export_dir, tokens_BxL, segment_ids_BxL, positions_BxL, t_B=None):
  """float64 logits [B, L, V] of the export in `export_dir` (config.json + safetensors only);
  `t_B` for a model with time_embedding."""
  with open(os.path.join(export_dir, "config.json")) as f:
    m = json.load(f)["model"]
  w = read_weights(export_dir)
  eps = m["norm_eps"]
  token_mask_BxL = np.asarray(segment_ids_BxL) > 0
  x = w["embed"][np.asarray(tokens_BxL)]
  if m.get("time_embedding"):
    x = x + time_embedding(t_B, w, m["d_model"])[:, None, :]
  for i in range(m["num_layers"]):
    p = f"layers.{i}."
    for b in range(x.shape[0]):
      x[b] = x[b] + attention(rms_norm(x[b], w[p + "attn_norm.scale"], eps), w, p + "attn.",
                              np.asarray(segment_ids_BxL)[b], np.asarray(positions_BxL)[b].astype(np.float64), m)
    h = rms_norm(x, w[p + "ffn_norm.scale"], eps)
    if m["moe"]["num_experts"] > 0 and i >= m["moe"]["first_k_dense"]:
      x = x + moe(h, w, p + "ffn.", token_mask_BxL, m)
    else:
      x = x + swiglu(h, w[p + "ffn.w_gate"], w[p + "ffn.w_up"], w[p + "ffn.w_down"])
  x = rms_norm(x, w["final_norm.scale"], eps)
  head = w["embed"].T if m["tie_embeddings"] else w["lm_head"]
  return x @ head
