"""The runs under an --output: which are complete, which catalog the next run reads, LATEST.

    OUTPUT/_LOCK              the lock of the run writing here (lock.py)
    OUTPUT/LATEST             the id of the newest complete run, written after its manifest
    OUTPUT/run=<id>/          one run: shards, catalog-*.parquet, manifest.json last

A run directory is complete when its manifest reads back and has the types later runs
rely on; one that does not (a run killed while writing it, a manifest that is not JSON or
has a field of the wrong type) is skipped with a warning naming it, never fatal. So is a
catalog that does not read whole with the catalog's columns: the next run builds on the
run before it. A complete run whose failed share was over --max_failed_fraction is `rejected`:
kept, but neither LATEST nor the next incremental run uses it.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from typing import Any

from batch_caption import catalog, records
from batch_caption.storage import files

LATEST_NAME = "LATEST"
_log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class EarlierRun:
    run_id: str
    run_dir: str
    manifest: dict[str, Any]

    @property
    def end_time(self) -> str:
        return str(self.manifest.get("end_time", ""))

    @property
    def rejected(self) -> bool:
        return bool(self.manifest.get("rejected"))

    @property
    def catalog_files(self) -> tuple[str, ...] | None:
        """The run's catalog files; None for a run written before catalogs existed."""
        names = self.manifest["files"].get("catalog")
        return None if names is None else tuple(files.join(self.run_dir, n) for n in names)

    @property
    def caption_files(self) -> tuple[str, ...]:
        return tuple(files.join(self.run_dir, n) for n in self.manifest["files"]["captions"])


def run_dir_of(output: str, run_id: str) -> str:
    return files.join(output, f"run={run_id}")


def read_run(run_dir: str) -> EarlierRun:
    """The run in `run_dir`; ValueError or OSError when its manifest does not read back
    or any field a later run uses has the wrong type (check_manifest)."""
    manifest = json.loads(files.read_bytes(files.join(run_dir, records.MANIFEST_NAME)))
    check_manifest(manifest)
    return EarlierRun(manifest["run_id"], run_dir, manifest)


def check_manifest(manifest: Any) -> None:
    """Raises ValueError, saying which field, unless every field that later runs read has
    its type: run_id a str; files an object whose captions (and errors, catalog when
    present) list plain file names; end_time a str, end_seconds a number, when present."""
    if not isinstance(manifest, dict):
        raise ValueError("not a run manifest (not a JSON object)")
    if not isinstance(manifest.get("run_id"), str) or not manifest["run_id"]:
        raise ValueError("run_id is not a non-empty string")
    listed = manifest.get("files")
    if not isinstance(listed, dict):
        raise ValueError("files is not an object")
    for kind in ("captions", "errors", "catalog"):
        if kind not in listed and kind != "captions":
            continue
        names = listed.get(kind)
        if kind == "catalog" and names is None:
            continue
        if not isinstance(names, list) or not all(_plain_name(n) for n in names):
            raise ValueError(f"files.{kind} is not a list of file names in the run directory")
    if not isinstance(manifest.get("end_time", ""), str):
        raise ValueError("end_time is not a string")
    seconds = manifest.get("end_seconds", 0.0)
    if isinstance(seconds, bool) or not isinstance(seconds, (int, float)):
        raise ValueError("end_seconds is not a number")


def _plain_name(name: Any) -> bool:
    """A file name in the run directory: no path, so a manifest points nowhere else."""
    return isinstance(name, str) and name not in ("", ".", "..") and "/" not in name and "\\" not in name


def complete_runs(output: str, other_than: str | None = None) -> list[EarlierRun]:
    """The complete runs under `output`, oldest first (by end time), but `other_than`."""
    found = []
    for path in files.matched(files.join(output, "run=*/" + records.MANIFEST_NAME)):
        run_dir = path[: -len(records.MANIFEST_NAME) - 1]
        if other_than is not None and files.basename(run_dir) == f"run={other_than}":
            continue
        try:
            found.append(read_run(run_dir))
        except (OSError, ValueError, KeyError, TypeError) as e:
            _log.warning("skipping %s: its manifest cannot be read (%s)", run_dir, e)
    # end_time has whole seconds; end_seconds (absent before format 2) orders runs within one.
    return sorted(found, key=lambda r: (r.end_time, r.manifest.get("end_seconds", 0.0), r.run_id))


@dataclasses.dataclass(frozen=True)
class Baseline:
    """What an incremental run compares the listing with: the newest complete run's
    catalog or, for outputs written before catalogs existed, the caption records of
    every complete run (read once: this run then writes the first catalog)."""

    catalog_files: tuple[str, ...] = ()
    catalog_rows: int = 0
    legacy_caption_files: tuple[str, ...] = ()
    end_times: dict[str, str] = dataclasses.field(default_factory=dict)
    run_ids: tuple[str, ...] = ()


def catalog_rows(run: EarlierRun) -> int | None:
    """The rows of `run`'s catalog once every file has passed check_catalog; None (and a
    warning naming the file) when one does not."""
    rows = 0
    for path in run.catalog_files or ():
        try:
            rows += check_catalog(path)
        except Exception as e:  # noqa: BLE001 - any failure to read means: do not build on it
            _log.warning("skipping %s: its catalog %s cannot be used (%s: %s)",
                         run.run_dir, files.basename(path), type(e).__name__, e)
            return None
    return rows


def check_catalog(path: str) -> int:
    """The rows of the catalog file at `path`, read whole, a row group at a time, so that
    a later stage finds no surprise: its columns have the catalog's types, and every page
    reads (checksums verified where written). Raises on any failure."""
    import pyarrow.parquet as pq

    with files.open_read(path) as f:
        parquet = pq.ParquetFile(f, page_checksum_verification=True)
        found = parquet.schema_arrow
        for field in catalog.schema():
            if found.get_field_index(field.name) < 0:
                if field.name in catalog.ADDED_COLUMNS:  # an older catalog: read as nulls
                    continue
                raise ValueError(f"no column {field.name}")
            if found.field(field.name).type != field.type:
                raise ValueError(f"column {field.name} is {found.field(field.name).type}, not {field.type}")
        rows = sum(parquet.read_row_group(i).num_rows for i in range(parquet.num_row_groups))
        if rows != parquet.metadata.num_rows:
            raise ValueError(f"{rows} rows read, the footer says {parquet.metadata.num_rows}")
    return rows


def baseline(runs: list[EarlierRun]) -> Baseline:
    """The Baseline from complete runs (oldest first): the newest readable catalog of a
    run not rejected; runs newer than it have no catalog only if older code wrote them."""
    usable = [r for r in runs if not r.rejected]
    for run in reversed(usable):
        if run.catalog_files is None:
            break
        rows = catalog_rows(run)
        if rows is not None:
            return Baseline(catalog_files=run.catalog_files, catalog_rows=rows, run_ids=(run.run_id,))
    legacy = [r for r in usable if r.catalog_files is None]
    return Baseline(
        legacy_caption_files=tuple(p for r in legacy for p in r.caption_files),
        end_times={r.run_id: r.end_time for r in legacy},
        run_ids=tuple(r.run_id for r in legacy),
    )


def read_latest(output: str) -> str | None:
    path = files.join(output, LATEST_NAME)
    return files.read_text(path).strip() or None if files.exists(path) else None


def point_latest(output: str, run_id: str | None) -> None:
    """LATEST names `run_id`, once that run's manifest reads back; None removes LATEST."""
    path = files.join(output, LATEST_NAME)
    if run_id is None:
        if files.exists(path):
            files.delete([path])
        return
    read_run(run_dir_of(output, run_id))
    files.write_bytes(path, (run_id + "\n").encode("utf-8"), mime_type="text/plain")


def release_latest(output: str, run_id: str, others: list[EarlierRun]) -> None:
    """Before a rerun of `run_id` clears its directory: if LATEST names it, LATEST goes
    back to the newest other complete run not rejected (or away when there is none)."""
    if read_latest(output) != run_id:
        return
    usable = [r for r in others if not r.rejected]
    point_latest(output, usable[-1].run_id if usable else None)


def clear_run_dir(run_dir: str) -> None:
    """Removes an earlier attempt of the same run id: manifest first (marks it incomplete)."""
    manifest = files.join(run_dir, records.MANIFEST_NAME)
    if files.exists(manifest):
        files.delete([manifest])
    files.delete_matching(files.join(run_dir, "**"))

