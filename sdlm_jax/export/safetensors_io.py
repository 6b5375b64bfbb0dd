"""Flat tensors to and from safetensors files, sharded above a size limit (Hugging Face layout).

Everything fits in `max_shard_bytes`: one file, `model.safetensors`. Otherwise the shards
`model-00001-of-0000N.safetensors`, ... and `model.safetensors.index.json`:
  {"metadata": {"total_size": BYTES}, "weight_map": {tensor name: shard file name}}
Tensors are written in name order (layer indices compared as numbers), each whole in one shard;
a tensor larger than the limit gets a shard of its own. bfloat16 is safetensors' BF16 (numpy
arrays of ml_dtypes.bfloat16 here). Paths are etils.epath paths: the files are written and read
as bytes, so any directory epath reaches (gs:// included) works.
"""

import json
import re

import ml_dtypes
import numpy as np
import safetensors
from etils import epath
from safetensors.numpy import save as _to_bytes

from sdlm_jax.export.errors import ExportInputError, ExportNotFoundError

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
DEFAULT_MAX_SHARD_BYTES = 5 * 10**9
# safetensors dtype tag -> numpy dtype (safetensors.numpy itself reads no BF16).
_DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
           "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_}


def name_order(name: str):
  """Sort key of a tensor name: digit runs compare as numbers (layers.2 before layers.10)."""
  return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]


def shard_names(flat: dict, max_shard_bytes: int) -> list[list[str]]:
  """The tensor names of each shard, filled greedily in name order up to max_shard_bytes."""
  shards, size = [[]], 0
  for name in sorted(flat, key=name_order):
    nbytes = flat[name].nbytes
    if shards[-1] and size + nbytes > max_shard_bytes:
      shards.append([])
      size = 0
    shards[-1].append(name)
    size += nbytes
  return shards


def shard_file(i: int, n: int) -> str:
  return f"model-{i + 1:05d}-of-{n:05d}.safetensors"


def write(flat: dict, directory, max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES, metadata=None) -> list[str]:
  """Writes `flat` ({name: array}) into `directory`; returns the file names written."""
  if max_shard_bytes <= 0:
    raise ExportInputError(f"--max_shard_bytes={max_shard_bytes}; allowed values: an integer > 0")
  directory = epath.Path(directory)
  arrays = {name: np.ascontiguousarray(np.asarray(a)) for name, a in flat.items()}
  shards = shard_names(arrays, max_shard_bytes)
  metadata = {"format": "np", **(metadata or {})}
  if len(shards) == 1:
    (directory / SINGLE_FILE).write_bytes(_to_bytes(arrays, metadata=metadata))
    return [SINGLE_FILE]
  files, weight_map = [], {}
  for i, names in enumerate(shards):
    files.append(shard_file(i, len(shards)))
    (directory / files[-1]).write_bytes(_to_bytes({n: arrays[n] for n in names}, metadata=metadata))
    weight_map.update({n: files[-1] for n in names})
  index = {"metadata": {"total_size": int(sum(a.nbytes for a in arrays.values()))}, "weight_map": weight_map}
  (directory / INDEX_FILE).write_text(json.dumps(index, indent=2))
  return files + [INDEX_FILE]


def exists(directory) -> bool:
  directory = epath.Path(directory)
  return (directory / INDEX_FILE).exists() or (directory / SINGLE_FILE).exists()


def read_file(path) -> dict:
  """{name: numpy array} of one safetensors file (BF16 as ml_dtypes.bfloat16)."""
  out = {}
  for name, view in safetensors.deserialize(epath.Path(path).read_bytes()):
    if view["dtype"] not in _DTYPES:
      raise ExportInputError(f"{path}: tensor {name!r} has dtype {view['dtype']}; allowed values: "
                             f"{', '.join(_DTYPES)}")
    out[name] = np.frombuffer(view["data"], _DTYPES[view["dtype"]]).reshape(view["shape"])
  return out


def read(directory) -> dict:
  """Every tensor of the export in `directory`: from the index's shards, else model.safetensors."""
  directory = epath.Path(directory)
  if (directory / INDEX_FILE).exists():
    weight_map = json.loads((directory / INDEX_FILE).read_text())["weight_map"]
    flat = {}
    for name in sorted(set(weight_map.values())):
      flat.update(read_file(directory / name))
    if set(flat) != set(weight_map):
      raise ExportInputError(f"{directory / INDEX_FILE}: the shards hold {len(flat)} tensors, the index names "
                             f"{len(weight_map)}; the export is incomplete")
    return flat
  if (directory / SINGLE_FILE).exists():
    return read_file(directory / SINGLE_FILE)
  raise ExportNotFoundError(f"{directory}: neither {SINGLE_FILE} nor {INDEX_FILE}; not a safetensors export")
