"""What `sdlm-prepare --input SPEC` reads: a streamed, splittable list of documents.

SPEC is comma-separated entries, each one of
  GLOB                     files by extension: `.txt` (one document per file), `.jsonl` or
                           `.jsonl.gz` (one JSON object per line, its `text_field` is the document),
                           `.array_record` (one UTF-8 document per record)
  tfds:NAME[/CONFIG]:SPLIT a split of a TFDS dataset already prepared under --tfds_data_dir (read
                           through `tfds.data_source`; nothing is downloaded)
Paths go through etils.epath, so `gs://bucket/...` globs work like local ones.

The input is cut into `Part`s that can be read independently (by different worker
processes): a `.txt` or `.jsonl.gz` file is one part; a `.jsonl` file is cut into byte ranges
(a line belongs to the range holding its first byte); ArrayRecord files and TFDS splits into
record ranges. `plan_parts` lists them in a fixed order with a size (bytes, or records for
TFDS) so that shards can be balanced; `read_part` yields a part's documents, never holding
more than one in memory.
"""

import dataclasses
import gzip
import json
import re

from etils import epath

from sdlm_jax.errors import DataFileError, InputNotFoundError, UserInputError

EXTENSIONS = (".txt", ".jsonl", ".jsonl.gz", ".array_record")
_GLOB_CHARS = re.compile(r"[*?\[]")
_TFDS_RE = re.compile(r"^tfds:([^:/]+)(?:/([^:]+))?:(.+)$")
TFDS_HINT = "pip install 'sdlm_jax[tfds]' (tensorflow-datasets)"


@dataclasses.dataclass(frozen=True)
class Part:
  """A piece of the input: `kind` (txt, jsonl, jsonl.gz, array_record, tfds), where, and [lo, hi)."""

  kind: str
  path: str
  lo: int
  hi: int
  size: int  # balancing weight: bytes (records for tfds)

  def to_json(self) -> list:
    return [self.kind, self.path, self.lo, self.hi, self.size]

  @classmethod
  def from_json(cls, row) -> "Part":
    return cls(*row)


def kind_of(path: str) -> str:
  for ext in sorted(EXTENSIONS, key=len, reverse=True):
    if path.endswith(ext):
      return ext[1:]
  raise UserInputError(f"--input file {path} has an unsupported extension; allowed: {', '.join(EXTENSIONS)} "
                       "or tfds:NAME[/CONFIG]:SPLIT")


def expand(pattern: str) -> list[str]:
  """Files matching one glob (local or gs://), sorted; a plain path must exist."""
  match = _GLOB_CHARS.search(pattern)
  if not match:
    path = epath.Path(pattern).expanduser()
    if not path.is_file():
      raise InputNotFoundError(f"--input {pattern} does not exist")
    return [str(path)]
  head = pattern[:match.start()]
  cut = head.rfind("/")
  base, rest = (head[:cut + 1] or ".", pattern[cut + 1:]) if cut >= 0 else (".", pattern)
  found = sorted(str(p) for p in epath.Path(base).expanduser().glob(rest) if p.is_file())
  return found


def _tfds_source(name: str, config: str | None, split: str, data_dir: str | None):
  """`tfds.data_source` of an already prepared dataset; clear errors when it cannot be."""
  try:
    import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel
  except ImportError as e:
    raise UserInputError(f"--input tfds:{name}:{split} needs tensorflow-datasets: {TFDS_HINT}") from e
  if not data_dir:
    raise UserInputError("--input tfds:... reads a dataset already prepared on disk: give --tfds_data_dir")
  full = f"{name}/{config}" if config else name
  try:
    return tfds.data_source(full, split=split, data_dir=data_dir, download=False)
  except Exception as e:  # tfds raises several types (not found, wrong file format)
    raise DataFileError(f"--input tfds:{full}:{split} cannot be read from --tfds_data_dir={data_dir} ({e}); "
                        "it must be prepared there with file_format='array_record'") from e


def plan_parts(spec: str, *, target_size: int, tfds_data_dir: str | None = None) -> list[Part]:
  """The parts of the input in a fixed order; splittable files are cut near `target_size`."""
  entries = [e.strip() for e in (spec or "").split(",") if e.strip()]
  if not entries:
    raise UserInputError("--input is empty; give comma-separated globs (.txt, .jsonl, .jsonl.gz, "
                         ".array_record) or tfds:NAME[/CONFIG]:SPLIT")
  target_size = max(1, int(target_size))
  parts: list[Part] = []
  for entry in entries:
    tfds_match = _TFDS_RE.match(entry)
    if tfds_match:
      name, config, split = tfds_match.groups()
      n = len(_tfds_source(name, config, split, tfds_data_dir))
      step = max(1, min(target_size, -(-n // 64)))  # at least 64 parts of a large split
      parts += [Part("tfds", entry, lo, min(n, lo + step), min(n, lo + step) - lo) for lo in range(0, n, step)]
      continue
    files = expand(entry)
    if not files:
      raise InputNotFoundError(f"--input {entry!r} matches no files")
    for path in files:
      kind = kind_of(path)
      size = epath.Path(path).stat().length
      if kind == "jsonl":
        parts += [Part(kind, path, lo, min(size, lo + target_size), min(size, lo + target_size) - lo)
                  for lo in range(0, max(size, 1), target_size)]
      elif kind == "array_record":
        n = _num_records(path)
        if n:
          per = max(1, n * target_size // max(size, 1))
          parts += [Part(kind, path, lo, min(n, lo + per), (min(n, lo + per) - lo) * size // n)
                    for lo in range(0, n, per)]
      else:
        parts.append(Part(kind, path, 0, 1, size))
  return parts


def _num_records(path: str) -> int:
  from array_record.python import array_record_module  # pylint: disable=import-outside-toplevel
  try:
    reader = array_record_module.ArrayRecordReader(path)
  except (RuntimeError, ValueError) as e:
    raise DataFileError(f"{path} is not a readable ArrayRecord file ({e})") from e
  try:
    return reader.num_records()
  finally:
    reader.close()


def _json_document(line: bytes, path: str, where: str, text_field: str) -> str | None:
  if not line.strip():
    return None
  try:
    obj = json.loads(line)
  except json.JSONDecodeError as e:
    raise DataFileError(f"{path} {where}: not a JSON object ({e})") from e
  if not isinstance(obj, dict) or not isinstance(obj.get(text_field), str):
    raise DataFileError(f"{path} {where}: no string field --text_field={text_field!r} "
                        f"(fields: {', '.join(obj) if isinstance(obj, dict) else type(obj).__name__})")
  return obj[text_field]


def _read_jsonl_range(path: str, lo: int, hi: int, text_field: str):
  with epath.Path(path).open("rb") as f:
    pos = lo
    if lo > 0:  # the line holding byte lo-1 belongs to the previous range
      f.seek(lo - 1)
      pos = lo - 1 + len(f.readline())
    while pos < hi:
      line = f.readline()
      if not line:
        return
      doc = _json_document(line, path, f"at byte {pos}", text_field)
      pos += len(line)
      if doc is not None:
        yield doc


def _read_jsonl_gz(path: str, text_field: str):
  with epath.Path(path).open("rb") as raw, gzip.open(raw, "rb") as f:
    for number, line in enumerate(f, 1):
      doc = _json_document(line, path, f"line {number}", text_field)
      if doc is not None:
        yield doc


def _read_array_record(path: str, lo: int, hi: int, chunk: int = 256):
  from array_record.python import array_record_module  # pylint: disable=import-outside-toplevel
  reader = array_record_module.ArrayRecordReader(path, "readahead_buffer_size:0")
  try:
    for start in range(lo, hi, chunk):
      for offset, record in enumerate(reader.read(list(range(start, min(hi, start + chunk))))):
        try:
          yield record.decode("utf-8")
        except UnicodeDecodeError as e:
          raise DataFileError(f"{path} record {start + offset} is not UTF-8 text ({e}); ArrayRecord "
                              "inputs hold one UTF-8 document per record") from e
  finally:
    reader.close()


def _read_tfds(entry: str, lo: int, hi: int, text_field: str, tfds_data_dir: str | None):
  name, config, split = _TFDS_RE.match(entry).groups()
  source = _tfds_source(name, config, split, tfds_data_dir)
  for i in range(lo, hi):
    example = source[i]
    value = example.get(text_field) if isinstance(example, dict) else None
    if value is None:
      raise DataFileError(f"{entry} example {i}: no field --text_field={text_field!r}")
    yield value.decode("utf-8") if isinstance(value, bytes) else str(value)


def read_part(part: Part, *, text_field: str = "text", tfds_data_dir: str | None = None):
  """The documents of a part, in file order (empty and whitespace-only ones are skipped)."""
  if part.kind == "txt":
    docs = iter([epath.Path(part.path).read_bytes().decode("utf-8", errors="replace")])
  elif part.kind == "jsonl":
    docs = _read_jsonl_range(part.path, part.lo, part.hi, text_field)
  elif part.kind == "jsonl.gz":
    docs = _read_jsonl_gz(part.path, text_field)
  elif part.kind == "array_record":
    docs = _read_array_record(part.path, part.lo, part.hi)
  elif part.kind == "tfds":
    docs = _read_tfds(part.path, part.lo, part.hi, text_field, tfds_data_dir)
  else:
    raise ValueError(f"unknown part kind {part.kind!r}")
  for doc in docs:
    if doc.strip():
      yield doc
