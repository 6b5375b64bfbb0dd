"""Where files live: local paths and gs:// URLs through one path layer (etils.epath).

Every path the library reads or writes for the user (run directories, data files, tokenizer
models, exports) goes through `path()`, which gives an `epath.Path`: a pathlib-like object
for local files and for `gs://bucket/...` objects alike (gs:// through gcsfs, installed with
etils[epath-gcs]). orbax takes the same paths and writes array data through tensorstore.
Files are written whole (`write_bytes`: never half a file for a reader) or appended to
(`append_bytes`: on gs:// the new bytes are composed onto the object, costing only their upload).

STORAGE_EMULATOR_HOST (the Cloud Storage client libraries' standard variable, e.g.
`http://127.0.0.1:9023`) points every gs:// access at a local emulator; `configure_emulator`
(run once when sdlm_jax is imported) translates it for each client that reads its own setting:

  gcsfs        reads STORAGE_EMULATOR_HOST itself; anonymous credentials are set (fsspec's gcs
               config) so no credential lookup leaves the machine, and gcsfs's zonal-bucket
               probe (a gRPC control-plane call the emulators do not serve) is turned off
  tensorstore  its gcs driver takes the endpoint from TENSORSTORE_GCS_HTTP_URL and, with
               GOOGLE_AUTH_TOKEN_FOR_TESTING set, a fixed bearer token instead of credentials
               (orbax writes and reads checkpoint arrays through it)
  array_record its C++ reader (riegeli, google-cloud-cpp) reads CLOUD_STORAGE_EMULATOR_ENDPOINT

Values already set in the environment are kept. Without STORAGE_EMULATOR_HOST nothing is
changed: gs:// goes to Cloud Storage with the machine's default credentials.
"""

import contextlib
import hashlib
import os
import pathlib
import shutil
import sys
import tempfile

from etils import epath

from sdlm_jax.errors import UserInputError

EMULATOR_ENV = "STORAGE_EMULATOR_HOST"
# What configure_emulator sets from STORAGE_EMULATOR_HOST, one variable per storage client.
CLIENT_EMULATOR_ENVS = ("TENSORSTORE_GCS_HTTP_URL", "CLOUD_STORAGE_EMULATOR_ENDPOINT",
                        "GOOGLE_AUTH_TOKEN_FOR_TESTING", "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT",
                        "FSSPEC_GCS_TOKEN")
REMOTE_PREFIXES = ("gs://",)
_GLOB_CHARS = frozenset("*?[")


def emulator_url() -> str | None:
  """The emulator's base URL from STORAGE_EMULATOR_HOST (scheme added if missing), or None."""
  host = os.environ.get(EMULATOR_ENV, "").strip()
  if host in ("", "default"):
    return None
  return host if host.startswith(("http://", "https://")) else f"http://{host}"


def configure_emulator() -> str | None:
  """Points gcsfs and tensorstore at STORAGE_EMULATOR_HOST (see the module docstring); its URL or None."""
  url = emulator_url()
  if url is None:
    return None
  os.environ.setdefault("TENSORSTORE_GCS_HTTP_URL", url)
  os.environ.setdefault("CLOUD_STORAGE_EMULATOR_ENDPOINT", url)  # array_record's reader (google-cloud-cpp)
  os.environ.setdefault("GOOGLE_AUTH_TOKEN_FOR_TESTING", "emulator")
  os.environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")  # read when gcsfs is imported
  os.environ.setdefault("FSSPEC_GCS_TOKEN", "anon")  # read when fsspec is imported
  if "fsspec" in sys.modules:  # already imported: its config no longer reads the environment
    import fsspec.config  # pylint: disable=import-outside-toplevel
    fsspec.config.conf.setdefault("gcs", {}).setdefault("token", "anon")
  return url


def is_remote(p) -> bool:
  return os.fspath(p).startswith(REMOTE_PREFIXES)


def path(p) -> epath.Path:
  """`p` as an epath.Path; a local path is made absolute (a run directory's config.json then
  works from any directory), a gs:// URL is kept as it is."""
  text = os.fspath(p)
  if is_remote(text):
    return epath.Path(text)
  return epath.Path(text).expanduser().absolute()


def location(p) -> str:
  """The string form of `path(p)`: what config.json and messages record."""
  return os.fspath(path(p))


def write_bytes(target, data: bytes) -> None:
  """Writes `target` whole, never leaving a partial file: on gs:// an object appears only when
  its upload completes; locally a temporary file next to it is renamed onto it."""
  target = path(target)
  if is_remote(target):
    target.write_bytes(data)
    return
  target.parent.mkdir(parents=True, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=os.fspath(target.parent), prefix=target.name + ".", suffix=".tmp")
  try:
    with os.fdopen(fd, "wb") as f:
      f.write(data)
    os.replace(tmp, os.fspath(target))
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)


def write_text(target, text: str) -> None:
  write_bytes(target, text.encode("utf-8"))


def append_bytes(target, data: bytes) -> None:
  """Adds `data` at the end of the file `target`, creating it if missing. Locally an ordinary
  append. A gs:// object cannot be appended to: `data` is uploaded as an object of its own and
  composed onto the end of `target` (Cloud Storage's server-side concatenation), so an append
  costs the upload of `data` only, whatever the size of `target`. One writer per target."""
  target = path(target)
  if not is_remote(target):
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(os.fspath(target), "ab") as f:
      f.write(data)
    return
  import fsspec  # pylint: disable=import-outside-toplevel
  fs, key = fsspec.core.url_to_fs(os.fspath(target))
  fs.invalidate_cache(key)  # ask the bucket, not a listing cached before the object was written
  if not fs.exists(key):
    fs.pipe_file(key, data)
    return
  tail = f"{key}.append"  # overwritten by the next append if a killed one left it behind
  fs.pipe_file(tail, data)
  try:
    fs.merge(key, [key, tail])
  finally:
    fs.rm_file(tail)


def copy_file(source, target) -> None:
  """Copies one file between any two locations (local or gs://), streamed, written whole."""
  source, target = path(source), path(target)
  if not is_remote(source) and not is_remote(target):
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.parent / f"{target.name}.tmp{os.getpid()}"
    shutil.copyfile(os.fspath(source), os.fspath(tmp))
    os.replace(os.fspath(tmp), os.fspath(target))
    return
  with source.open("rb") as src, target.open("wb") as dst:
    shutil.copyfileobj(src, dst, 8 << 20)


def version(p) -> str:
  """What changes whenever the file `p` is rewritten (for cache keys): size and mtime in ns
  locally; size and object generation on gs:// (read from the bucket, nothing downloaded)."""
  if not is_remote(p):
    st = os.stat(location(p))
    return f"{st.st_size}:{st.st_mtime_ns}"
  import fsspec  # pylint: disable=import-outside-toplevel
  fs, key = fsspec.core.url_to_fs(os.fspath(p))
  info = fs.info(key)
  return f"{info.get('size')}:{info.get('generation') or info.get('updated') or info.get('mtime')}"


@contextlib.contextmanager
def local_copy(p):
  """A local file path with the contents of `p`: `p` itself when local, else a temporary download
  (for readers that take only a local file name, such as array_record's), removed afterwards."""
  if not is_remote(p):
    yield location(p)
    return
  fd, tmp = tempfile.mkstemp(prefix="sdlm-", suffix="-" + path(p).name)
  os.close(fd)
  try:
    copy_file(p, tmp)
    yield tmp
  finally:
    os.remove(tmp)


def glob(pattern: str) -> list[str]:
  """The files matching one glob pattern (local or gs://), sorted. `**` (any depth) works locally;
  on gs:// it would list every object under the prefix, so it is refused there."""
  text = os.path.expanduser(pattern.strip())
  parts = text.split("/")
  first = next((i for i, part in enumerate(parts) if _GLOB_CHARS & set(part)), None)
  if first is None:
    p = path(text)
    return [os.fspath(p)] if p.is_file() else []
  if is_remote(text) and "**" in parts[first:]:
    raise UserInputError(f"{pattern!r}: '**' is not supported on gs:// (it lists the whole prefix); allowed "
                         "values: '*', '?' and '[...]' within a folder level, e.g. gs://bucket/corpus/*/*.txt")
  if is_remote(text) and first <= 2:  # gs://<pattern>: the bucket itself

    raise UserInputError(f"{pattern!r}: the bucket name cannot be a pattern")
  base = path("/".join(parts[:first]) or ".")
  rest = "/".join(parts[first:])
  # epath's glob refuses '**' everywhere; pathlib's matches it at any depth for local files.
  matches = base.glob(rest) if is_remote(text) else pathlib.Path(base).glob(rest)
  return sorted(os.fspath(m) for m in matches if m.is_file())


def files_under(directory) -> list[epath.Path]:
  """Every file below `directory` (local or gs://), at any depth, sorted."""
  out = []
  for child in path(directory).iterdir():
    out.extend(files_under(child) if child.is_dir() else [child])
  return sorted(out)


def digest(p) -> str:
  """A fingerprint of the file's bytes: sha256 locally; on gs:// the object's stored crc32c (or md5),
  read from the bucket without downloading, and sha256 of its bytes where neither is given."""
  if is_remote(p):
    import fsspec  # pylint: disable=import-outside-toplevel
    fs, key = fsspec.core.url_to_fs(os.fspath(p))
    info = fs.info(key)
    for field in ("crc32c", "md5Hash"):
      if info.get(field):
        return f"{field}:{info[field]}"
  h = hashlib.sha256()
  with path(p).open("rb") as f:
    for block in iter(lambda: f.read(8 << 20), b""):
      h.update(block)
  return f"sha256:{h.hexdigest()}"


def move_tree(source, target) -> None:
  """Moves a file or directory (local: a rename; gs://: copy then delete of every object)."""
  source, target = path(source), path(target)
  if not is_remote(source):
    target.parent.mkdir(parents=True, exist_ok=True)
    os.replace(os.fspath(source), os.fspath(target))
    return
  import fsspec  # pylint: disable=import-outside-toplevel
  fs, key = fsspec.core.url_to_fs(os.fspath(source))
  fs.mv(key, fsspec.core.url_to_fs(os.fspath(target))[1], recursive=True)
