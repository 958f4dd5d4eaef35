"""Google Cloud Storage set-up shared by every entry point.

Beam's GCS filesystem asks google-auth for default credentials the first time a gs://
path is touched in a process; with none configured it retries for a long while, then
connects anonymously, and the storage client's own retries end in a timeout that never
says "credentials". So an entry point given a gs:// path looks the credentials up once
first (require_credentials) and stops with one line naming the ways to provide them.
An emulator (STORAGE_EMULATOR_HOST) needs no credentials, so there we go anonymous at
once.
"""

from __future__ import annotations

import functools
import os
import threading
from collections.abc import Iterable

from batch_caption.cli import UsageError

# google-auth's own lookup on a machine that is not on GCE asks the metadata server
# (GCE_METADATA_TIMEOUT, 3 s, up to 3 times); give up on it before that.
CREDENTIALS_LOOKUP_S = 6.0
HOW_TO_LOGIN = ("run `gcloud auth application-default login`, or set GOOGLE_APPLICATION_CREDENTIALS to a "
                "service-account key file")
_found_credentials = False


class MissingCredentials(UsageError):
    """A gs:// path and no Google Cloud credentials: exit 2 before any work."""


def require_credentials(paths: Iterable[str | None]) -> None:
    """Raises MissingCredentials when one of `paths` is on gs://, no emulator is set and
    google-auth finds no default credentials (within CREDENTIALS_LOOKUP_S)."""
    global _found_credentials
    remote = [p for p in paths if p and p.startswith("gs://")]
    if not remote or _found_credentials or os.environ.get("STORAGE_EMULATOR_HOST"):
        return
    outcome: list[BaseException | None] = []

    def look_up():
        import google.auth

        try:
            google.auth.default()
            outcome.append(None)
        except Exception as e:  # noqa: BLE001 - DefaultCredentialsError, or a broken key file
            outcome.append(e)

    lookup = threading.Thread(target=look_up, name="credentials-lookup", daemon=True)
    lookup.start()
    lookup.join(CREDENTIALS_LOOKUP_S)
    if outcome and outcome[0] is None:
        _found_credentials = True
        return
    if not outcome:
        found = f" (the lookup took over {CREDENTIALS_LOOKUP_S:g} s)"
    else:
        found = "" if _default_error(outcome[0]) else f" ({' '.join(str(outcome[0]).split())})"
    raise MissingCredentials(f"{remote[0]}: no Google Cloud credentials{found}; {HOW_TO_LOGIN}")


def _default_error(e: BaseException) -> bool:
    """Whether `e` is google-auth's plain 'none found' (whose text adds only a link)."""
    from google.auth.exceptions import DefaultCredentialsError

    return type(e) is DefaultCredentialsError and "were not found" in str(e)


def configure_for_emulator() -> bool:
    """Connects anonymously when STORAGE_EMULATOR_HOST is set; returns whether it did.

    Idempotent and cheap; called at the start of every process that may read gs://
    (entry points, Beam worker set-up), since worker processes do not share state.
    """
    if not os.environ.get("STORAGE_EMULATOR_HOST"):
        return False
    from apache_beam.internal.gcp import auth

    # Beam caches the credentials per process; None makes it build anonymous clients.
    # pylint: disable=protected-access
    with auth._Credentials._credentials_lock:
        auth._Credentials._credentials = None
        auth._Credentials._credentials_init = True
    return True


def shared_client():
    """One client() per process (and emulator), for many small requests: a client's
    creation costs more than a small request."""
    return _shared_client(os.environ.get("STORAGE_EMULATOR_HOST"))


@functools.lru_cache(maxsize=None)
def _shared_client(emulator: str | None):
    return client()


def client():
    """A google-cloud-storage client: anonymous for an emulator, else the default
    credentials, with the project from the environment when it names one."""
    from google.cloud import storage

    project = os.environ.get("GOOGLE_CLOUD_PROJECT") or os.environ.get("CLOUDSDK_CORE_PROJECT")
    if os.environ.get("STORAGE_EMULATOR_HOST"):
        from google.auth.credentials import AnonymousCredentials

        return storage.Client(project=project or "batch-caption", credentials=AnonymousCredentials())
    return storage.Client(project=project) if project else storage.Client()
