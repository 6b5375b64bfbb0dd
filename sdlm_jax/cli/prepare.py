"""sdlm-prepare: tokenize a corpus once into ArrayRecord shards that training reads in place.

  sdlm-prepare --input '/data/web/*.jsonl.gz' --out /data/web-prepared --vocab_size 32768
  sdlm-prepare --input 'gs://bucket/books/*.txt,gs://bucket/wiki/*.jsonl' --out gs://bucket/prepared \
      --tokenizer tokenizer.model
  sdlm-prepare --input tfds:wikipedia/20230601.en:train --tfds_data_dir /data/tfds --out /data/wiki
  sdlm-train --config configs/demo.py --config.data.source=prepared --config.data.paths=/data/web-prepared

--input takes comma-separated globs of .txt (one document per file), .jsonl / .jsonl.gz (the
--text_field of each line) and .array_record (one UTF-8 document per record) files, or a TFDS
split already prepared under --tfds_data_dir. Worker processes write whole shards; an
interrupted run, re-run with the same arguments, writes only the missing shards.
"""

from absl import app, flags

from sdlm_jax.cli import common

PROG = "sdlm-prepare"

_INPUT = flags.DEFINE_string("input", None, "Comma-separated globs (.txt, .jsonl, .jsonl.gz, .array_record; "
                             "local or gs://) or tfds:NAME[/CONFIG]:SPLIT.", required=True)
_OUT = flags.DEFINE_string("out", None, "Output directory (local or gs://).", required=True)
_TOKENIZER = flags.DEFINE_string("tokenizer", None, "An existing sentencepiece model to use (its special ids "
                                 "must be pad 0, unk 1, bos 2, eos 3, [MASK] 4); default: train one.")
_VOCAB = flags.DEFINE_integer("vocab_size", 4096, "Pieces of the tokenizer trained when --tokenizer is not given.")
_VAL = flags.DEFINE_float("val_fraction", 0.05, "Share of documents held out for validation (by a stable hash "
                          "of each document's text).")
_SHARDS = flags.DEFINE_integer("num_shards", 0, "Shards per split (0: max(16, input size / 64 MiB), or the "
                               "number an interrupted run of this --out chose).")
_WORKERS = flags.DEFINE_integer("workers", 0, "Worker processes (0: all cores).")
_TEXT_FIELD = flags.DEFINE_string("text_field", "text", "The field holding the text in .jsonl lines and TFDS examples.")
_TFDS_DIR = flags.DEFINE_string("tfds_data_dir", None, "Where the TFDS dataset of a tfds:... input is prepared "
                                "(nothing is downloaded).")
_SAMPLE = flags.DEFINE_integer("sample_chars", 4_000_000, "Characters of training documents the tokenizer is "
                               "trained on (a sample spread over the input).")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  common.quiet_logs()
  from sdlm_jax.data import prepare  # pylint: disable=import-outside-toplevel
  opts = prepare.Options(input=_INPUT.value, out=_OUT.value, tokenizer=_TOKENIZER.value, vocab_size=_VOCAB.value,
                         val_fraction=_VAL.value, num_shards=_SHARDS.value, workers=_WORKERS.value,
                         text_field=_TEXT_FIELD.value, tfds_data_dir=_TFDS_DIR.value, sample_chars=_SAMPLE.value)
  prepare.run(opts, log=lambda line: print(line, flush=True))


def run():
  common.run_main(main, PROG)


if __name__ == "__main__":
  run()
