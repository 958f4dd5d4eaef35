"""Small test data builders shared by test modules (importable: pytest.ini pythonpath)."""

from __future__ import annotations


def varied_images(n: int, size: int = 64, seed: int = 0):
    """uint8 [n, size, size, 3]: each image its own colour and gradient, plus noise, so
    that even a random network tells them apart (plain noise pools to the same vector)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    ramp = np.linspace(0.0, 1.0, size)[None, :, None]
    base = rng.uniform(0, 255, (n, 1, 1, 3))
    slope = rng.uniform(-120, 120, (n, 1, 1, 3))
    noise = rng.normal(0, 10, (n, size, size, 3))
    return np.clip(base + slope * ramp + noise, 0, 255).astype(np.uint8)


def evaluate_main(argv) -> int:
    """`python -m batch_caption.evaluate ARGV`'s exit code, in process: its errors leave
    through SystemExit, where the other entry points' main(argv) return a code."""
    from batch_caption import evaluate

    try:
        evaluate.run(argv)
    except SystemExit as e:
        return e.code
    return 0


def within(seconds: float, fn, *args, **kwargs):
    """fn(*args, **kwargs), run in a daemon thread; fails the test when it has not
    returned after `seconds` (a hang: the thread is left blocked, the test goes on)."""
    import threading

    import pytest

    out = {}

    def target():
        try:
            out["value"] = fn(*args, **kwargs)
        except BaseException as e:  # handed to the caller
            out["error"] = e

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(seconds)
    if thread.is_alive():
        pytest.fail(f"{getattr(fn, '__name__', fn)} still running after {seconds} s: it hangs")
    if "error" in out:
        raise out["error"]
    return out.get("value")


def special_files(directory) -> dict:
    """name -> path of things in `directory` that are not regular files, directly and
    through symlinks: a FIFO with no writer, a socket, a character device, a directory."""
    import os
    import shutil
    import socket
    import tempfile

    directory = str(directory)
    paths = {name: os.path.join(directory, name) for name in (
        "fifo.png", "fifo_link.png", "zero_link.png", "socket.png", "dir.png", "dir_link.png")}
    os.mkfifo(paths["fifo.png"])
    os.symlink(paths["fifo.png"], paths["fifo_link.png"])
    os.symlink("/dev/zero", paths["zero_link.png"])
    short = tempfile.mkdtemp(dir="/tmp")  # a socket's path has at most 107 bytes
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(os.path.join(short, "s"))
    sock.close()
    shutil.move(os.path.join(short, "s"), paths["socket.png"])
    os.rmdir(short)
    os.mkdir(paths["dir.png"])
    os.symlink(paths["dir.png"], paths["dir_link.png"])
    return paths


def caption_record(path: str, **fields) -> dict:
    """A caption record of `path` with the fields the catalog and the manifest read
    (records.caption_record's), plain values unless `fields` give others."""
    record = {"path": path, "caption": "a thing", "score": -0.5, "logprob": -1.0, "alternatives": [], "flags": [],
              "width": 8, "height": 8, "format": "PNG", "bytes": 10, "sha256": "s", "modified": 1.0, "model": "m",
              "run_id": "r0", "decode": {"beam_size": 3}}
    return {**record, **fields}


def write_catalog(path, rows) -> str:
    """Writes catalog rows (dicts of catalog.COLUMNS) as one Parquet catalog file; -> its path."""
    from batch_caption import catalog

    with open(path, "wb") as f:
        catalog.write_rows(f, rows)
    return str(path)
