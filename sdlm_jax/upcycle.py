"""Upcycling: an MoE model initialised from a trained dense model of the same backbone.

Sparse upcycling (Komatsuzaki et al., 2023) copies a dense FFN into every expert; for experts
finer than the dense FFN, the dense hidden units are split into groups (He et al., 2024,
"virtual groups"). Both are one rule here. With a dense SwiGLU of width F, an MoE layer with
shared width F_s (num_shared_experts x expert_mlp_dim) and E routed experts of width F_e:

  G = (F - F_s) / F_e        shards per copy of the rest of the FFN (1: coarse, >1: fine-grained)
  shared expert              hidden units [0, F_s) of the dense FFN
  routed expert e            shard s = e mod G of units [F_s, F): units F_s + s*F_e ... + F_e,
                             in virtual group v = e div G; its down projection is multiplied by G
  router column e            one random column per virtual group (init_std), the same for the
                             G experts of that group; a selection bias (if any) starts at 0

The G experts of a virtual group have equal router logits, so both routers take or leave a
group whole: token choice's top-k (k a multiple of G) picks k/G complete groups, each expert
choice expert of a group picks the same tokens. The experts of a group get equal gates g_v,
and gates are normalised over a token's experts (both routers: sum_v G g_v = 1), so the routed
output sum_v sum_s g_v * G * FFN_s(x) = FFN_rest(x), the dense FFN's units [F_s, F); with the
shared expert's units [0, F_s) that is the dense FFN itself. The
upcycled model's logits therefore equal the dense model's at step 0 under token choice;
under expert choice this holds for every token at least one expert picked (a token no expert
picks keeps only the shared expert and the residual), so logits are equal only when every
token is picked. Attention, norms and embeddings are copied; dense layers the MoE model keeps
(model.moe.first_k_dense) copy their FFN. routed_scaling_factor and dynamic scaling factors
other than 1 scale the routed output and break the equality (a warning says so).
"""

import numpy as np

from sdlm_jax.errors import UserInputError
from sdlm_jax.model.stacks import is_moe_layer

FFN_WEIGHTS = ("w_gate", "w_up", "w_down")


class UpcycleError(UserInputError):
  """The dense run and the MoE config cannot be matched."""


def shard_count(dense_model, moe_model) -> int:
  """G: the routed experts' shards per copy of the dense FFN (what the shared expert leaves)."""
  moe = moe_model.moe
  shared = moe.num_shared_experts * moe.expert_mlp_dim
  rest = dense_model.mlp_dim - shared
  if rest <= 0 or rest % moe.expert_mlp_dim:
    raise UpcycleError(
        f"the dense FFN's width model.mlp_dim={dense_model.mlp_dim} less the shared experts' "
        f"{moe.num_shared_experts} x {moe.expert_mlp_dim} = {shared} must be a positive multiple of the expert width "
        f"model.moe.expert_mlp_dim={moe.expert_mlp_dim}")
  shards = rest // moe.expert_mlp_dim
  if moe.num_experts % shards:
    raise UpcycleError(f"model.moe.num_experts={moe.num_experts} must be a multiple of the {shards} shards each "
                       f"copy of the dense FFN is split into ((mlp_dim - shared width) / expert_mlp_dim)")
  if moe.router == "token_choice" and moe.top_k % shards:
    raise UpcycleError(f"model.moe.top_k={moe.top_k} must be a multiple of the {shards} shards per copy, so that "
                       "token choice takes whole copies of the dense FFN")
  return shards


def check_backbone(dense_model, moe_model):
  """Everything outside the FFNs must be the same network."""
  for field in ("vocab_size", "num_layers", "d_model", "num_heads", "num_kv_heads", "head_dim", "causal", "qk_norm",
                "tie_embeddings", "rope_theta", "norm_eps", "time_embedding"):
    if dense_model.get(field) != moe_model.get(field):
      raise UpcycleError(f"model.{field}: the dense run has {dense_model.get(field)!r}, the MoE config "
                         f"{moe_model.get(field)!r}; upcycling keeps the backbone, so they must be equal")
  if dense_model.moe.num_experts:
    raise UpcycleError(f"--from: the run is already an MoE (model.moe.num_experts={dense_model.moe.num_experts}); "
                       "upcycle a dense run")
  if not moe_model.moe.num_experts:
    raise UpcycleError("--config: model.moe.num_experts=0 is a dense model; give an MoE config")


def _routed_experts(dense: dict, shared: int, width: int, shards: int, num_experts: int) -> dict:
  """{w_gate [E, D, Fe], w_up, w_down [E, Fe, D]} from one dense layer's FFN."""
  out = {}
  for name in FFN_WEIGHTS:
    pieces = []
    for e in range(num_experts):
      lo = shared + (e % shards) * width
      w = dense[name]
      piece = w[lo:lo + width, :] * shards if name == "w_down" else w[:, lo:lo + width]
      pieces.append(piece)
    out[name] = np.stack(pieces)
  return out


def upcycle(dense_flat: dict, dense_model, moe_flat: dict, moe_model, seed: int = 0) -> dict:
  """The MoE model's flat tensors (tensor_names) from the dense model's: `moe_flat` (a fresh
  init of the MoE model) gives the names and shapes to fill."""
  check_backbone(dense_model, moe_model)
  moe = moe_model.moe
  shards = shard_count(dense_model, moe_model)
  shared = moe.num_shared_experts * moe.expert_mlp_dim
  rng = np.random.default_rng(seed)
  out = {}
  for name, init in moe_flat.items():
    parts = name.split(".")
    is_moe_ffn = parts[0] == "layers" and parts[2] == "ffn" and is_moe_layer(moe_model, int(parts[1]))
    if not is_moe_ffn:
      if name not in dense_flat or tuple(dense_flat[name].shape) != tuple(init.shape):
        raise UpcycleError(f"tensor {name!r}: the dense run has "
                           f"{tuple(dense_flat[name].shape) if name in dense_flat else 'none'}, the MoE model needs "
                           f"{tuple(init.shape)}")
      out[name] = np.asarray(dense_flat[name])
  for layer in range(moe_model.num_layers):
    if not is_moe_layer(moe_model, layer):
      continue
    prefix = f"layers.{layer}.ffn"
    dense = {w: np.asarray(dense_flat[f"{prefix}.{w}"], np.float32) for w in FFN_WEIGHTS}
    for w, value in _routed_experts(dense, shared, moe.expert_mlp_dim, shards, moe.num_experts).items():
      out[f"{prefix}.{w}"] = value
    if shared:
      out[f"{prefix}.shared.w_gate"] = dense["w_gate"][:, :shared]
      out[f"{prefix}.shared.w_up"] = dense["w_up"][:, :shared]
      out[f"{prefix}.shared.w_down"] = dense["w_down"][:shared, :]
    groups = rng.normal(0.0, moe_model.init_std, (moe_model.d_model, moe.num_experts // shards))
    out[f"{prefix}.router"] = np.repeat(groups, shards, axis=1)
    for name in moe_flat:
      if name.startswith(prefix + ".") and name not in out:
        out[name] = np.zeros_like(np.asarray(moe_flat[name]))  # e.g. the selection bias
  for name, init in moe_flat.items():
    out[name] = np.asarray(out[name]).astype(np.asarray(init).dtype)
    if out[name].shape != tuple(init.shape):
      raise UpcycleError(f"tensor {name!r}: upcycled to {out[name].shape}, the MoE model needs {tuple(init.shape)}")
  return out


def breaks_equality(moe_model) -> str | None:
  """Why the upcycled model's function will differ from the dense model's, or None."""
  moe = moe_model.moe
  if moe.routed_scaling_factor != 1.0:
    return f"model.moe.routed_scaling_factor={moe.routed_scaling_factor} scales the routed output"
  if moe.dynamic_scaling_factors and any(f != 1.0 for f in moe.dynamic_scaling_factors):
    return "model.moe.dynamic_scaling_factors rescale the gates"
  if moe.router == "expert_choice":
    return "expert choice leaves the tokens no expert picks without the routed part of the FFN"
  return None
