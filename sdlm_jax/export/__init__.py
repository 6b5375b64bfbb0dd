"""Exported models: a trained run as a self-contained directory (sdlm-export) and back.

  directory.export_run(workdir, out, ...)   writes config.json, tokenizer.model, params/ (orbax),
                                            model.safetensors, forward.jax_export
  pretrained.load_pretrained(dir)           (model, tokenizer, config); also sdlm_jax.load_pretrained

tensor_names: the flat per-layer tensor names; safetensors_io: (sharded) safetensors files;
forward: the `jax.export` forward pass. The README's export section documents the format.
"""
