"""sdlm-generate: sample text from a trained SDLM with the masked-diffusion reverse process.

  sdlm-generate --workdir runs/demo --prompt "ROMEO." --prompt "To be" --length 64 --steps 64
  sdlm-generate --workdir runs/demo --prompt "ROMEO. [MASK] [MASK] love" --length 0

Defaults come from the run's `sample` config section; flags override them and are checked by
the same rules (sdlm_jax.diffusion.sampler.check_settings). Every [MASK] in a prompt is
filled (infilling); with --length 0 nothing is generated after the prompt. The model comes
from a run directory (--workdir, its latest checkpoint unless --step N names another) or from
a directory written by sdlm-export (--model):
  sdlm-generate --model exports/demo --prompt "ROMEO."
"""

import sys

from absl import app, flags

from sdlm_jax.cli import common, model_source

flags.adopt_module_key_flags(model_source)  # --workdir, --model, --step in --help

PROG = "sdlm-generate"

_PROMPTS = flags.DEFINE_multi_string("prompt", [""], "Prompt text (repeat for a batch of prompts); each [MASK] "
                                     "in it is filled.")
_LENGTH = flags.DEFINE_integer("length", None, "Tokens to generate per prompt (default: the run's sample.length; "
                               "0: only fill the prompts' [MASK]s).")
_STEPS = flags.DEFINE_integer("steps", None, "Denoising steps, at most one per decoded position (default: the "
                              "run's sample.steps; with --length, one step per position).")
_BLOCK = flags.DEFINE_integer("block_size", None, "Semi-autoregressive block size (0: one block; default: the "
                              "run's sample.block_size).")
_TEMPERATURE = flags.DEFINE_float("temperature", None, "Sampling temperature (0: greedy; default: the run's "
                                  "sample.temperature).")
_TOP_P = flags.DEFINE_float("top_p", None, "Nucleus sampling mass in (0, 1] (default: the run's sample.top_p).")
_REMASKING = flags.DEFINE_string("remasking", None, "Which predictions to commit: low_confidence | random "
                                 "(default: the run's sample.remasking).")
_CFG_SCALE = flags.DEFINE_float("cfg_scale", None, "Classifier-free guidance scale (0: off; default: the run's "
                                "sample.cfg_scale).")
_SEED = flags.DEFINE_integer("seed", 0, "Sampling seed.")


def sample_settings(sample_cfg, fewest_masks: int):
  """The run's sample section with the flags applied.

  --length without --steps takes one step per decoded position (with --length 0: per [MASK]).
  """
  common.apply_flags(sample_cfg, length=_LENGTH.value, steps=_STEPS.value, block_size=_BLOCK.value,
                     temperature=_TEMPERATURE.value, top_p=_TOP_P.value, remasking=_REMASKING.value,
                     cfg_scale=_CFG_SCALE.value)
  if _LENGTH.value is not None and _STEPS.value is None:
    sample_cfg.steps = sample_cfg.length or fewest_masks
  return sample_cfg


def warn_past_trained_length(prompt_tokens: int, length: int, seq_len: int):
  """One line on stderr when the sequence runs past the positions the model was trained on."""
  total = prompt_tokens + length
  if total > seq_len:
    sys.stderr.write(f"{PROG}: warning: the longest prompt ({prompt_tokens} tokens with BOS) + --length {length} = "
                     f"{total} positions exceeds the trained data.seq_len={seq_len}; positions past it were never "
                     "trained (RoPE), expect worse text\n")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  common.quiet_logs()
  import jax  # pylint: disable=import-outside-toplevel
  from sdlm_jax import config as config_lib  # pylint: disable=import-outside-toplevel
  from sdlm_jax.diffusion import sampler  # pylint: disable=import-outside-toplevel

  cfg, tokenizer = model_source.load_config()
  prompts = [[tokenizer.bos_id] + tokenizer.encode(p) for p in _PROMPTS.value]
  fewest_masks = min(p.count(tokenizer.mask_id) for p in prompts)
  s = sample_settings(cfg.sample, fewest_masks)
  config_lib.validate_sample(s, fewest_masks=fewest_masks, prefix="--")  # before the checkpoint is read
  warn_past_trained_length(max(len(p) for p in prompts), s.length, cfg.data.seq_len)
  _, _, model, step = model_source.load()
  rows = sampler.complete(
      model, prompts, length=s.length, steps=s.steps, block_size=s.block_size, temperature=s.temperature,
      top_p=s.top_p, remasking=s.remasking, cfg_scale=s.cfg_scale, mask_id=tokenizer.mask_id,
      eos_id=tokenizer.eos_id, pad_id=tokenizer.pad_id, rng=jax.random.key(_SEED.value), progress=True,
      kernel=cfg.diffusion.kernel, schedule=cfg.diffusion.schedule)
  print(f"# checkpoint step {step}")
  for prompt, (filled, continuation) in zip(_PROMPTS.value, rows):
    print(f"--- prompt: {prompt!r}")
    print(tokenizer.decode(filled + continuation))


def run():
  common.run_main(main, PROG)


if __name__ == "__main__":
  run()
