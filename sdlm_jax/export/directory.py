"""An export directory: a trained model that runs without its run directory (`sdlm-export`).

  DIR/config.json          what rebuilds and uses the model (below); written last
  DIR/tokenizer.model      the run's sentencepiece model
  DIR/params/              params-only orbax checkpoint (no optimizer state) of the model's own
                           params tree as a nested dict (scanned stacks stay stacked), in the
                           export's dtype
  DIR/model.safetensors    the same tensors under flat per-layer names (tensor_names), sharded
                           above --max_shard_bytes with model.safetensors.index.json
  DIR/forward.jax_export   the serialised forward pass (sdlm_jax.export.forward)

config.json (JSON object):
  export      format name and version, the run directory and checkpoint step it came from, the
              exported and the trained param dtype, the files of each format written
  tokenizer   its file, the special ids (pad, unk, bos, eos, mask, newline) and its piece count
  model       the run's model section (everything that rebuilds the network), with
              param_dtype set to the exported dtype
  seed, diffusion, data, eval, sample, train.batch_size
              as in the run: generation defaults (sample), and what sdlm-eval --model needs to
              rebuild the validation split (data) and score it the way the run did (diffusion,
              eval, and train.batch_size, the evaluation batch size)

Restoring never uses the training mesh: the checkpoint is read onto one device of this host
(restore.single_device_mesh), so a multi-host run exports from a single CPU machine. All paths
written go through etils.epath.
"""

import json

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from flax import nnx

from sdlm_jax import storage
from sdlm_jax.data import tokenizer as tokenizer_lib
from sdlm_jax.export import forward as forward_lib
from sdlm_jax.export import safetensors_io, tensor_names
from sdlm_jax.export.errors import ExportInputError, ExportNotFoundError

FORMAT_NAME = "sdlm_jax.export"
FORMAT_VERSION = 1
FORMATS = ("orbax", "safetensors", "stablehlo")
DTYPES = ("bfloat16", "float32")
CONFIG_FILE = "config.json"
TOKENIZER_FILE = "tokenizer.model"
PARAMS_DIR = "params"
FORWARD_FILE = "forward.jax_export"
RUN_SECTIONS = ("seed", "model", "diffusion", "data", "eval", "sample")


def parse_list(flag: str, text, allowed) -> tuple[str, ...]:
  """A comma-separated flag value as a tuple, each item one of `allowed`."""
  items = tuple(t.strip() for t in (text.split(",") if isinstance(text, str) else text) if t.strip())
  bad = [t for t in items if t not in allowed]
  if bad or not items:
    raise ExportInputError(f"{flag}={text!r}; allowed values: one or more of {', '.join(allowed)}, comma-separated")
  return items


def check_dtype(dtype):
  if dtype is not None and dtype not in DTYPES:
    raise ExportInputError(f"--dtype={dtype!r}; allowed values: {', '.join(DTYPES)}")


def _check_out(out: epath.Path):
  if out.exists() and (not out.is_dir() or any(out.iterdir())):
    raise ExportInputError(f"--out={out}: exists and is not an empty directory; allowed values: a new or "
                           "empty directory")


def check_workdir(workdir):
  from sdlm_jax import workdir as workdir_lib  # pylint: disable=import-outside-toplevel
  if not (epath.Path(workdir) / workdir_lib.CONFIG_FILE).exists():
    raise ExportNotFoundError(f"--workdir={workdir}: no {workdir_lib.CONFIG_FILE} there; allowed values: a run "
                              "directory written by sdlm-train")


def _tokenizer_section(tokenizer) -> dict:
  t = tokenizer_lib
  return {"file": TOKENIZER_FILE, "pad_id": t.PAD_ID, "unk_id": t.UNK_ID, "bos_id": t.BOS_ID, "eos_id": t.EOS_ID,
          "mask_id": t.MASK_ID, "newline_id": t.NEWLINE_ID, "num_pieces": tokenizer.vocab_size}


def export_config(cfg, tokenizer, *, workdir, step: int, dtype: str, files: dict) -> dict:
  """The contents of config.json (see the module docstring)."""
  run = cfg.to_dict()
  out = {"export": {"format": FORMAT_NAME, "version": FORMAT_VERSION, "workdir": storage.location(workdir),
                    "step": int(step), "dtype": dtype, "trained_param_dtype": cfg.model.param_dtype,
                    "files": files},
         "tokenizer": _tokenizer_section(tokenizer)}
  out.update({key: run[key] for key in RUN_SECTIONS})
  out["model"] = {**run["model"], "param_dtype": dtype}
  out["train"] = {"batch_size": run["train"]["batch_size"]}
  return out


def save_params(path: epath.Path, params) -> None:
  """A params-only orbax checkpoint at `path` of `params` (an nnx.State of arrays), saved as its
  pure nested dict, so orbax alone restores it (`StandardCheckpointer().restore(path)`)."""
  checkpointer = ocp.StandardCheckpointer()
  checkpointer.save(path, nnx.to_pure_dict(params))
  checkpointer.wait_until_finished()
  checkpointer.close()


def export_run(workdir, out, *, step=None, dtype=None, formats=FORMATS,
               max_shard_bytes: int = safetensors_io.DEFAULT_MAX_SHARD_BYTES,
               platforms=forward_lib.DEFAULT_PLATFORMS) -> dict:
  """Writes the export of run `workdir` (checkpoint `step`, None: the latest) into `out`.

  `dtype` None keeps the trained param dtype. Returns the config.json written. Arguments are
  checked before anything is read, with errors that name the matching sdlm-export flag.
  """
  from sdlm_jax.train import restore  # pylint: disable=import-outside-toplevel
  formats = parse_list("--formats", formats, FORMATS)
  platforms = parse_list("--platforms", platforms, forward_lib.PLATFORMS)
  check_dtype(dtype)
  if not isinstance(max_shard_bytes, int) or max_shard_bytes <= 0:
    raise ExportInputError(f"--max_shard_bytes={max_shard_bytes!r}; allowed values: an integer > 0")
  out = storage.path(out)
  _check_out(out)
  check_workdir(workdir)
  cfg, tokenizer, _, params, _, step = restore.restore_run(str(workdir), step, restore.single_device_mesh())
  dtype = dtype or cfg.model.param_dtype
  params = jax.tree.map(lambda a: a.astype(dtype), params)
  model_cfg = cfg.model.copy_and_resolve_references()
  model_cfg.param_dtype = dtype
  flat = tensor_names.flatten(jax.device_get(nnx.to_pure_dict(params)), model_cfg)

  out.mkdir(parents=True, exist_ok=True)
  files = {}
  if "orbax" in formats:
    save_params(out / PARAMS_DIR, params)
    files["orbax"] = [PARAMS_DIR]
  if "safetensors" in formats:
    files["safetensors"] = safetensors_io.write(
        flat, out, max_shard_bytes, metadata={"format_name": FORMAT_NAME, "step": str(step), "dtype": dtype})
  if "stablehlo" in formats:
    forward_lib.write(forward_lib.export_forward(model_cfg, param_specs_of(flat), platforms), out / FORWARD_FILE)
    files["stablehlo"] = [FORWARD_FILE]
  storage.copy_file(tokenizer.model_path, out / TOKENIZER_FILE)
  config = export_config(cfg, tokenizer, workdir=workdir, step=step, dtype=dtype, files=files)
  (out / CONFIG_FILE).write_text(json.dumps(config, indent=2))
  return config


def read_config(directory) -> dict:
  """The config.json of an export directory, or ExportNotFoundError naming --model."""
  path = epath.Path(directory) / CONFIG_FILE
  if not path.exists():
    raise ExportNotFoundError(f"--model={directory}: no {CONFIG_FILE} there; allowed values: a directory "
                              "written by sdlm-export")
  config = json.loads(path.read_text())
  if config.get("export", {}).get("format") != FORMAT_NAME:
    raise ExportInputError(f"--model={directory}: {CONFIG_FILE} is not an sdlm_jax export (a run directory? "
                           "use --workdir for those)")
  return config


def param_specs_of(flat: dict) -> dict:
  """{name: ShapeDtypeStruct} of flat tensors: the params argument of the exported forward pass."""
  return {name: jax.ShapeDtypeStruct(np.shape(a), a.dtype) for name, a in flat.items()}
