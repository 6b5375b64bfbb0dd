"""Flat tensor names of a model's params: one dotted name per tensor, whatever the run's layout.

The model holds its params in a tree: `stacks.S.blocks...` per layer stack (dense layers first,
then MoE layers; sdlm_jax.model.stacks), each block's params stacked on a leading `layers` axis
when `model.scan_layers` is set, one subtree per block otherwise. Exported files name every
tensor by the block's global layer index instead, so a scanned and an unrolled run of the same
model export the same names and shapes:

  embed, lm_head, final_norm.scale                      outside the layers
  layers.<i>.<path inside the block>                    e.g. layers.3.attn.wq, layers.3.ffn.router

`<i>` counts 0..num_layers-1 across both stacks. The README's export section lists every name
with its shape.
"""

from sdlm_jax.export.errors import ExportInputError
from sdlm_jax.model.stacks import layer_stacks

LAYERS = "layers"


def leaves(tree, prefix=()):
  """(path, leaf) of every leaf of a nested mapping (a params pure dict), depth first."""
  for key, value in tree.items():
    path = prefix + (key,)
    if hasattr(value, "items"):
      yield from leaves(value, path)
    else:
      yield path, value


def _join(path) -> str:
  return ".".join(str(k) for k in path)


def names_of(path, model_cfg) -> tuple[list[str], bool]:
  """The flat name(s) of the param at `path` of the model's tree, and whether the leaf is a
  scanned stack (one name per layer, in order along its leading axis) rather than one tensor."""
  if path[0] != "stacks":
    return [_join(path)], False
  stack, rest = int(path[1]), path[2:]
  if rest[0] != "blocks":
    raise ValueError(f"unexpected param path {_join(path)!r}: a layer stack holds only `blocks`")
  first = sum(n for n, _ in layer_stacks(model_cfg)[:stack])
  num = layer_stacks(model_cfg)[stack][0]
  if model_cfg.scan_layers:
    return [_join((LAYERS, first + j) + rest[1:]) for j in range(num)], True
  return [_join((LAYERS, first + int(rest[1])) + rest[2:])], False


def flatten(params_tree, model_cfg) -> dict:
  """{flat name: array} of a params pure dict (nnx.to_pure_dict of an nnx.State); scanned leaves are
  split into their layers (indexing: numpy views, jax slices)."""
  flat = {}
  for path, leaf in leaves(params_tree):
    names, stacked = names_of(path, model_cfg)
    for j, name in enumerate(names):
      flat[name] = leaf[j] if stacked else leaf
  return flat


def unflatten(flat: dict, template_tree, model_cfg, stack):
  """The params pure dict laid out like `template_tree` (whose leaves have .shape), taking each
  leaf from `flat`; `stack` (np.stack or jnp.stack) joins the layers of a scanned leaf.

  Raises ExportInputError naming a missing, unexpected or wrongly shaped tensor.
  """
  used = set()

  def build(tree, prefix):
    out = {}
    for key, value in tree.items():
      path = prefix + (key,)
      if hasattr(value, "items"):
        out[key] = build(value, path)
        continue
      names, stacked = names_of(path, model_cfg)
      missing = [n for n in names if n not in flat]
      if missing:
        raise ExportInputError(f"tensor {missing[0]!r} is missing from the weights; config.json's model needs it "
                               "(see the README's tensor table)")
      used.update(names)
      leaf = stack([flat[n] for n in names]) if stacked else flat[names[0]]
      if tuple(leaf.shape) != tuple(value.shape):
        raise ExportInputError(f"tensor {names[0]!r} has shape {tuple(flat[names[0]].shape)}; the config "
                               f"needs {tuple(value.shape)[1:] if stacked else tuple(value.shape)}")
      out[key] = leaf
    return out

  tree = build(template_tree, ())
  extra = sorted(set(flat) - used)
  if extra:
    raise ExportInputError(f"tensor {extra[0]!r} is not a param of the config's model "
                           f"({len(extra)} unexpected tensors); config.json and the weights disagree")
  return tree
