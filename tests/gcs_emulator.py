"""gcp-storage-emulator, with the generation preconditions that GCS enforces and it ignores.

Run as the emulator's own command line (`python tests/gcs_emulator.py start ...`). An
upload or delete with ifGenerationMatch is refused with 412 unless the object's
generation matches (0: the object must not exist), atomically across the server's
threads, as GCS does: the output lock's create-only write depends on it.
"""

from __future__ import annotations

import threading
from http import HTTPStatus
from urllib.parse import unquote

from gcp_storage_emulator.exceptions import NotFound
from gcp_storage_emulator.handlers import objects

_lock = threading.Lock()


def _precondition_failed(request, response, storage, object_id: str) -> bool:
    wanted = request.query.get("ifGenerationMatch")
    if not wanted:
        return False
    try:
        current = storage.get_file_obj(request.params["bucket_name"], object_id)["generation"]
    except NotFound:
        current = "0"
    if str(current) == wanted[0]:
        return False
    response.status = HTTPStatus.PRECONDITION_FAILED
    response.json({"error": {"code": 412, "message": "Precondition Failed"}})
    return True


def _upload_name(request) -> str | None:
    if "name" in request.query:
        return request.query["name"][0]
    data = request.data
    if isinstance(data, dict):
        return (data.get("meta") or {}).get("name") or data.get("name")
    return None


def _guarded(handler, name_of):
    def handle(request, response, storage, *args, **kwargs):
        with _lock:
            name = name_of(request)
            if name is not None and _precondition_failed(request, response, storage, name):
                return None
            return handler(request, response, storage, *args, **kwargs)

    return handle


objects.insert = _guarded(objects.insert, _upload_name)
objects.delete = _guarded(objects.delete, lambda request: unquote(request.params.get("object_id") or "") or None)

if __name__ == "__main__":
    from gcp_storage_emulator.__main__ import main

    main()
