"""Where outputs live: paths and files on local disks and object stores alike.

    files        path joins and whole-file I/O (local paths and gs://, s3://, ...)
    gcs          anonymous GCS for the emulator, credentials looked up once
    lock         OUTPUT/_LOCK: one writer per output
    run_dirs     the runs under an --output: complete ones, the baseline catalog, LATEST

This `__init__` imports nothing, so importing one module of the package runs no other.
"""
