"""Logical-axis rules: the one table mapping logical array axes to mesh axes.

Every parameter and key activation in the model is annotated with logical axis names
(left column); a rule set maps each to a mesh axis (or None: replicated). Rule sets are
selected by name with `get_rules(name)`.

Parameter axes:  vocab, embed, heads, kv_heads, head_dim, mlp, expert, expert_mlp, norm, layers
Activation axes: activation_batch, activation_batch_no_expert, activation_length, activation_embed, activation_heads,
                 activation_kv_heads, activation_mlp, activation_vocab, activation_expert,
                 activation_capacity
"""

MESH_AXES = ("data", "fsdp", "expert", "model")
# The batch is split over these (outside the expert FFNs the expert axis is more data
# parallelism; tokens reach their experts' devices by all-to-all, sdlm_jax/parallel/expert.py).
BATCH_MESH_AXES = ("data", "fsdp", "expert")

_PARAM_RULES = (
    ("vocab", "model"),
    ("embed", "fsdp"),
    ("heads", "model"),
    ("kv_heads", "model"),
    ("head_dim", None),
    ("mlp", "model"),
    ("expert", "expert"),
    ("expert_mlp", "model"),
    ("norm", None),
    ("layers", None),  # the stacked-layer axis of scanned params
)

_ACTIVATION_RULES = (
    ("activation_batch", BATCH_MESH_AXES),
    ("activation_batch_no_expert", ("data", "fsdp")),  # batch of expert-sharded buffers
    ("activation_length", None),
    ("activation_embed", None),
    ("activation_heads", "model"),
    ("activation_kv_heads", "model"),
    ("activation_mlp", "model"),
    ("activation_vocab", "model"),
    ("activation_expert", "expert"),
    ("activation_capacity", None),
)

def _replicate_params(rules):
  return tuple((name, None) for name, _ in rules)


RULE_SETS = {
    # FSDP over `fsdp`, experts over `expert`, tensor parallelism over `model`.
    "default": _ACTIVATION_RULES + _PARAM_RULES,
    # Pure data parallelism: every param replicated, only the batch is split.
    "data": _ACTIVATION_RULES + _replicate_params(_PARAM_RULES),
}


def get_rules(name: str = "default"):
  if name not in RULE_SETS:
    raise ValueError(f"mesh.rules={name!r}; allowed values: {', '.join(sorted(RULE_SETS))}")
  return RULE_SETS[name]
