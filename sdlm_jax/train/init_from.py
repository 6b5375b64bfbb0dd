"""`train.init_from`: a new run's first weights from an export directory (written by sdlm-export
or sdlm-upcycle) instead of a random initialisation. Only a fresh start reads it; a resumed run
continues from its own checkpoints. The export's tokenizer must be the run's, byte for byte."""

from sdlm_jax import storage
from sdlm_jax.errors import UserInputError
from sdlm_jax.export import pretrained


def check(cfg, tokenizer):
  """Before anything is written: the export exists and has the run's tokenizer."""
  path = cfg.train.init_from
  _, exported_tokenizer = pretrained.load_config_and_tokenizer(path)
  if storage.path(exported_tokenizer.model_path).read_bytes() != storage.path(tokenizer.model_path).read_bytes():
    raise UserInputError(f"train.init_from={path!r}: its tokenizer.model differs from the one this run's data "
                         "config gives; train with the data (and tokenizer) the weights were trained with")


def load(cfg, params):
  """`params` (the freshly initialised, sharded State) replaced by the export's tensors."""
  path = cfg.train.init_from
  params = pretrained.load_params(path, params, cfg.model)
  print(f"Initialised the weights from {path}.", flush=True)
  return params
