"""Validation: the masked-diffusion ELBO perplexity bound next to a unigram baseline.

The ELBO uses antithetic t, a fixed number of samples and a fixed seed, so the number is
reproducible; the unigram model (add-one smoothed, fit on the training split) is the floor
any language model must beat by far. Its counts come from the prepared data's manifest
(counted once by sdlm-prepare), or for the other sources from one cached pass over the
training split on all cores.
"""

import math

import numpy as np

from sdlm_jax.data import pipeline
from sdlm_jax.diffusion import likelihood
from sdlm_jax.errors import DataFileError


def validation_batches(cfg, tokenizer, batch_size: int, num_batches: int) -> list[dict]:
  """The first `num_batches` validation batches, in a fixed order (no shuffle, one epoch)."""
  pipeline.prepare(cfg.data, cfg.model.vocab_size)  # cached; rebuilds the splits if data_dir was cleared
  val_cfg = cfg.data.copy_and_resolve_references()
  val_cfg.shuffle = False
  it = pipeline.make_iterator(val_cfg, tokenizer, split="val", batch_size=batch_size, seed=cfg.eval.seed,
                              num_epochs=1)
  batches = []
  for batch in it:
    batches.append(batch)
    if len(batches) == num_batches:
      break
  if not batches:
    raise DataFileError(f"the validation split holds less than one batch ({batch_size} x data.seq_len="
                        f"{cfg.data.seq_len} tokens; data.val_fraction={cfg.data.val_fraction}, "
                        f"data.source={cfg.data.source!r}): raise data.val_fraction or add data")
  return batches


def evaluate(cfg, model, tokenizer, *, progress: bool = False) -> dict:
  """ELBO perplexity bound (AR: exact perplexity) and unigram perplexity on the validation split.

  `progress`: a bar over the validation batches on stderr (sdlm-eval shows one).
  """
  batches = validation_batches(cfg, tokenizer, cfg.train.batch_size, cfg.eval.num_batches)
  if cfg.diffusion.loss == "ar":
    result = likelihood.ar_nll(model, batches, progress=progress)
  else:
    result = likelihood.elbo_bound(
        model, batches, num_t_samples=cfg.eval.num_t_samples, seed=cfg.eval.seed,
        schedule_name=cfg.diffusion.schedule, t_min=cfg.diffusion.t_min, mask_id=tokenizer.mask_id,
        kernel=cfg.diffusion.kernel, progress=progress)
  val_tokens = np.concatenate([b["tokens"][b["segment_ids"] > 0] for b in batches])
  counts = pipeline.token_counts(cfg.data, tokenizer, "train")
  unigram = likelihood.unigram_perplexity(counts, val_tokens)
  out = {f"val/{k}": float(v) for k, v in result.items()}
  out["val/unigram_ppl"] = float(unigram)
  out["val/unigram_nll_per_token"] = math.log(unigram)
  return out
