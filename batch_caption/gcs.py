"""Google Cloud Storage set-up shared by every entry point.

Beam's GCS filesystem asks google-auth for default credentials the first time a gs://
path is touched in a process; with none configured it retries for a long while before
connecting anonymously. An emulator (STORAGE_EMULATOR_HOST) needs no credentials, so
there we go anonymous at once.
"""

from __future__ import annotations

import os


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


def client():
    """A google-cloud-storage client: anonymous for an emulator, else the default
    credentials, with the project from the environment when it names one."""
    from google.cloud import storage

    project = os.environ.get("GOOGLE_CLOUD_PROJECT") or os.environ.get("CLOUDSDK_CORE_PROJECT")
    if os.environ.get("STORAGE_EMULATOR_HOST"):
        from google.auth.credentials import AnonymousCredentials

        return storage.Client(project=project or "batch-caption", credentials=AnonymousCredentials())
    return storage.Client(project=project) if project else storage.Client()
