"""gcp-storage-emulator with the generation headers Cloud Storage sends on every object download.

Cloud Storage answers a download with the object's `x-goog-generation` and
`x-goog-metageneration` headers; gcp-storage-emulator leaves them out. tensorstore (through which
orbax writes checkpoint arrays) takes an object's generation from that header when it reads an
OCDBT manifest back, and its next conditional write of the manifest then fails with "Malformed
StorageGeneration". This launcher adds the two headers to the emulator's download handler and
starts it with the usual command line:

  python tests/gcs_emulator.py start --host 127.0.0.1 --port 9023 --in-memory --default-bucket b
"""

from http import HTTPStatus

from gcp_storage_emulator import server
from gcp_storage_emulator.__main__ import main
from gcp_storage_emulator.handlers import objects

_download = objects.download


def download_with_generation(request, response, storage, *args, **kwargs):
  _download(request, response, storage, *args, **kwargs)
  if response.status in (HTTPStatus.OK, HTTPStatus.PARTIAL_CONTENT):
    obj = storage.get_file_obj(request.params["bucket_name"], request.params["object_id"])
    response["x-goog-generation"] = str(obj["generation"])
    response["x-goog-metageneration"] = str(obj["metageneration"])


objects.download = download_with_generation  # objects.get (alt=media) calls it by this name
for _, methods in server.HANDLERS:
  for method, handler in methods.items():
    if handler is _download:
      methods[method] = download_with_generation

if __name__ == "__main__":
  main()
