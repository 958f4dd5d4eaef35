"""WriteRun's shards: per-bundle temp files, published once under their final names."""

from __future__ import annotations

import json

import pytest

from batch_caption.pipeline import shards


@pytest.fixture(params=["local", "gcs"])
def run_dir(request, tmp_path):
    if request.param == "local":
        return str(tmp_path / "run=w")
    bucket = request.getfixturevalue("gcs_emulator")
    return f"gs://{bucket}/shards/{request.node.originalname}/run=w"


def _write_bundle(fn, rows):
    fn.start_bundle()
    for r in rows:
        assert not list(fn.process(r) or [])  # records go to the file, nothing downstream
    return [wv.value for wv in fn.finish_bundle() or []]


def _lines(path):
    from apache_beam.io.filesystems import FileSystems

    with FileSystems.open(path) as f:
        return [json.loads(x) for x in f.read().decode().splitlines()]


def test_bundles_write_temp_shards_that_the_manifest_step_names_once(run_dir):
    """Each bundle writes its own temp file; publishing names them kind-SSSSS-of-NNNNN in
    the run dir, gives a kind without records an empty shard, is safe to repeat (a retried
    step), and the temp dir goes, with what a failed attempt left there."""
    from apache_beam.io.filesystems import FileSystems

    temp = shards.temp_dir_of(run_dir)
    fn = shards.WriteShardFn(temp, "captions")
    fn.setup()
    rows = [{"path": f"p{i}", "caption": "a thing"} for i in range(5)]
    written = _write_bundle(fn, rows[:3]) + _write_bundle(fn, []) + _write_bundle(fn, rows[3:])
    assert len(written) == 2 and all(w.startswith(temp) for w in written)
    _write_bundle(fn, rows[:1])  # an attempt whose output never reached the manifest step: an orphan
    fn.start_bundle()
    list(fn.process(rows[0]) or [])
    failed = fn._path
    fn.teardown()  # a bundle that failed midway: its file is deleted at once
    assert not FileSystems.exists(failed)

    final = [FileSystems.join(run_dir, f"captions-0000{i}-of-00002.jsonl") for i in range(2)]
    written.sort()
    FileSystems.rename([written[0]], [final[0]])  # an earlier attempt of the step renamed one, then failed
    first = shards.publish_shards(run_dir, "captions", written)
    again = shards.publish_shards(run_dir, "captions", written)
    assert first == again == final
    assert sorted((r for f in first for r in _lines(f)), key=lambda r: r["path"]) == rows
    [empty] = shards.publish_shards(run_dir, "errors", [])
    assert empty.endswith("errors-00000-of-00001.jsonl") and _lines(empty) == []

    shards.remove_temp_dir(run_dir)
    left = sorted(m.path for m in FileSystems.match([FileSystems.join(run_dir, "**")])[0].metadata_list)
    assert left == sorted(first + [empty])


def test_catalog_shards_are_parquet_and_an_empty_run_gets_a_valid_empty_one(run_dir):
    """Catalog rows stream into Parquet per bundle; with no rows the published shard is
    still a Parquet file (0 rows), so readers never meet an empty byte string."""
    import pyarrow.parquet as pq
    from apache_beam.io.filesystems import FileSystems

    from batch_caption import catalog

    fn = shards.WriteShardFn(shards.temp_dir_of(run_dir), "catalog", "parquet")
    fn.setup()
    rows = [catalog.failed_row({"path": f"p{i}", "stage": "decode", "error": "E", "message": "m", "run_id": "r"},
                               1, 2.0, None, "m", {}) for i in range(3)]
    written = _write_bundle(fn, rows)
    [final] = shards.publish_shards(run_dir, "catalog", written, "parquet")
    assert final.endswith("catalog-00000-of-00001.parquet")
    with FileSystems.open(final) as f:
        assert [r["path"] for r in catalog.read_rows(f)] == ["p0", "p1", "p2"]
    [empty] = shards.publish_shards(run_dir + "-empty", "catalog", [], "parquet")
    with FileSystems.open(empty) as f:
        assert pq.read_table(f).num_rows == 0
