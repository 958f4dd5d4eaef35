"""WriteRun's shards: per-bundle temp files, published once under their final names."""

from __future__ import annotations

import json

import pytest

from batch_caption.job import write


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

    temp = write.temp_dir_of(run_dir)
    fn = write._WriteShardFn(temp, "captions")
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
    first = write.publish_shards(run_dir, "captions", written)
    again = write.publish_shards(run_dir, "captions", written)
    assert first == again == final
    assert sorted((r for f in first for r in _lines(f)), key=lambda r: r["path"]) == rows
    [empty] = write.publish_shards(run_dir, "errors", [])
    assert empty.endswith("errors-00000-of-00001.jsonl") and _lines(empty) == []

    write.remove_temp_dir(run_dir)
    left = sorted(m.path for m in FileSystems.match([FileSystems.join(run_dir, "**")])[0].metadata_list)
    assert left == sorted(first + [empty])
