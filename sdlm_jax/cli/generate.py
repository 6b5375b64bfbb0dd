"""sdlm-generate: sample text from a trained SDLM with the masked-diffusion reverse process.

  sdlm-generate --workdir runs/demo --prompt "ROMEO." --prompt "To be" --length 64 --steps 64
  sdlm-generate --model exports/demo --prompt "ROMEO."     (a directory written by sdlm-export)

Defaults come from the run's `sample` config section; flags override them. --step N loads
checkpoint N of --workdir instead of the latest.
"""

from absl import app, flags

from sdlm_jax.cli import common, model_source

flags.adopt_module_key_flags(model_source)  # --workdir, --model, --step in --help

_PROMPTS = flags.DEFINE_multi_string("prompt", [""], "Prompt text (repeat for a batch of prompts).")
_LENGTH = flags.DEFINE_integer("length", None, "Tokens to generate per prompt.")
_STEPS = flags.DEFINE_integer("steps", None, "Denoising steps.")
_BLOCK = flags.DEFINE_integer("block_size", None, "Semi-autoregressive block size (0: one block).")
_TEMPERATURE = flags.DEFINE_float("temperature", None, "Sampling temperature (0: greedy).")
_TOP_P = flags.DEFINE_float("top_p", None, "Nucleus sampling mass.")
_REMASKING = flags.DEFINE_enum("remasking", None, ["low_confidence", "random"], "Which predictions to commit.")
_CFG_SCALE = flags.DEFINE_float("cfg_scale", None, "Classifier-free guidance scale (0: off).")
_SEED = flags.DEFINE_integer("seed", 0, "Sampling seed.")


def _override(value, default):
  return default if value is None else value


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  common.quiet_logs()
  import jax  # pylint: disable=import-outside-toplevel
  from sdlm_jax.diffusion import sampler  # pylint: disable=import-outside-toplevel

  cfg, tokenizer, model, step = model_source.load("sdlm-generate")
  s = cfg.sample
  prompts = [[tokenizer.bos_id] + tokenizer.encode(p) for p in _PROMPTS.value]
  outputs = sampler.generate(
      model, prompts, length=_override(_LENGTH.value, s.length), steps=_override(_STEPS.value, s.steps),
      block_size=_override(_BLOCK.value, s.block_size), temperature=_override(_TEMPERATURE.value, s.temperature),
      top_p=_override(_TOP_P.value, s.top_p), remasking=_override(_REMASKING.value, s.remasking),
      cfg_scale=_override(_CFG_SCALE.value, s.cfg_scale), mask_id=tokenizer.mask_id, eos_id=tokenizer.eos_id,
      pad_id=tokenizer.pad_id, rng=jax.random.key(_SEED.value))
  print(f"# checkpoint step {step}")
  for prompt, out in zip(_PROMPTS.value, outputs):
    print(f"--- prompt: {prompt!r}")
    print(prompt + tokenizer.decode(out))


def run():
  app.run(main)


if __name__ == "__main__":
  run()
