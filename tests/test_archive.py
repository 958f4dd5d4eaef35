"""Nightly runs over an archive: the catalog, what incremental runs read, runs that never wedge."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import types

import pyarrow.parquet as pq
import pytest
from helpers import varied_images
from PIL import Image

from batch_caption import catalog, run
from batch_caption.core import bounded_reads
from batch_caption.storage import files, run_dirs


def _write_pngs(folder, names, seed):
    folder.mkdir(parents=True, exist_ok=True)
    for name, px in zip(names, varied_images(len(names), 64, seed=seed)):
        Image.fromarray(px).save(folder / name)


def _catalog(out: str, run_id: str) -> dict[str, dict]:
    """The run's catalog read with pyarrow alone: file name -> row."""
    manifest = json.loads(open(os.path.join(out, f"run={run_id}", "manifest.json")).read())
    table = pq.read_table([os.path.join(out, f"run={run_id}", n) for n in manifest["files"]["catalog"]],
                          partitioning=None)
    rows = table.to_pylist()
    assert len({catalog.path_of(r) for r in rows}) == len(rows), "one row per path"
    return {os.path.basename(catalog.path_of(r)): r for r in rows}


@pytest.fixture
def read_paths(monkeypatch):
    """Every path whose bytes the job reads (first reads and hashes), in this process."""
    seen: list[str] = []
    real_read, real_hash = bounded_reads.read_file, bounded_reads.hash_file

    def read_file(path, *args, **kwargs):
        seen.append(os.path.basename(path))
        return real_read(path, *args, **kwargs)

    def hash_file(path, *args, **kwargs):
        seen.append(os.path.basename(path))
        return real_hash(path, *args, **kwargs)

    monkeypatch.setattr(bounded_reads, "read_file", read_file)
    monkeypatch.setattr(bounded_reads, "hash_file", hash_file)
    return seen


def _bump_mtime(path, seconds=10):
    st = os.stat(path)
    os.utime(path, (st.st_atime, st.st_mtime + seconds))


def test_catalog_holds_the_archive_and_incremental_runs_read_only_what_changed(tiny_bundle, tmp_path, read_paths):
    src, out = tmp_path / "archive", str(tmp_path / "out")
    _write_pngs(src, [f"{i}.png" for i in range(6)], seed=1)
    (src / "corrupt.jpg").write_bytes(b"\xff\xd8\xff not really a jpeg")
    base = ["--input", str(src), "--output", out, "--model", tiny_bundle, "--incremental"]

    first = run.run(base + ["--run_id", "r1"])
    assert first["counts"]["captioned"] == 6 and first["counts"]["failed"] == 1 and first["counts"]["read"] == 7
    one = _catalog(out, "r1")
    assert sorted(one) == sorted([f"{i}.png" for i in range(6)] + ["corrupt.jpg"])
    assert one["corrupt.jpg"]["status"] == "failed" and one["corrupt.jpg"]["stage"] == "decode"
    assert one["0.png"]["status"] == "captioned" and one["0.png"]["caption"] and one["0.png"]["size"] > 0

    _write_pngs(src, ["new.png"], seed=2)  # new
    Image.fromarray(varied_images(1, 64, seed=3)[0]).save(src / "0.png")  # modified
    _bump_mtime(src / "0.png")
    (src / "5.png").unlink()  # deleted
    _bump_mtime(src / "1.png", 20)  # touched: same bytes, new mtime
    read_paths.clear()
    second = run.run(base + ["--run_id", "r2"])
    two = _catalog(out, "r2")
    assert sorted(two) == sorted(["0.png", "1.png", "2.png", "3.png", "4.png", "new.png", "corrupt.jpg"])
    assert {n: r["captioned_run"] for n, r in two.items()} == {
        "0.png": "r2", "new.png": "r2", "1.png": "r1", "2.png": "r1", "3.png": "r1", "4.png": "r1", "corrupt.jpg": "r1"}
    assert two["1.png"]["modified"] == os.stat(src / "1.png").st_mtime  # the touch is recorded
    assert two["2.png"]["caption"] == one["2.png"]["caption"]
    assert sorted(read_paths) == ["0.png", "1.png", "new.png"]  # the touched file is read, to hash it
    c = second["counts"]
    assert (c["captioned"], c["read"], c["carried"], c["deleted"], c["catalog_rows"]) == (2, 3, 5, 1, 7)

    read_paths.clear()
    third = run.run(base + ["--run_id", "r3"])
    assert read_paths == []  # nothing changed: nothing read, the failed file included
    c = third["counts"]
    assert (c["captioned"], c["failed"], c["read"], c["carried"], c["deleted"]) == (0, 0, 0, 7, 0)
    assert _catalog(out, "r3") == two

    read_paths.clear()
    retried = run.run(base + ["--run_id", "r4", "--retry_failed"])
    assert read_paths == ["corrupt.jpg"] and retried["counts"]["failed"] == 1
    assert _catalog(out, "r4")["corrupt.jpg"]["captioned_run"] == "r4"

    wider = run.run(base + ["--run_id", "r5", "--beam_size", "2"])  # other decode settings: caption again
    assert wider["counts"]["captioned"] == 6 and wider["counts"]["failed"] == 1 and wider["counts"]["carried"] == 0
    assert {r["captioned_run"] for r in _catalog(out, "r5").values()} == {"r5"}
    assert run_dirs.read_latest(out) == "r5"


def test_an_output_written_without_catalogs_is_read_once_to_build_the_first(tiny_bundle, tmp_path, read_paths):
    src, out = tmp_path / "archive", str(tmp_path / "out")
    _write_pngs(src, [f"{i}.png" for i in range(4)], seed=5)
    base = ["--input", str(src), "--output", out, "--model", tiny_bundle, "--incremental"]
    run.run(base + ["--run_id", "old"])
    # What older code wrote: the same run without catalog files or their manifest entry.
    manifest_path = os.path.join(out, "run=old", "manifest.json")
    manifest = json.loads(open(manifest_path).read())
    for name in manifest["files"].pop("catalog"):
        os.remove(os.path.join(out, "run=old", name))
    open(manifest_path, "w").write(json.dumps(manifest))

    read_paths.clear()
    built = run.run(base + ["--run_id", "new"])
    assert read_paths == [] and built["counts"]["carried"] == 4 and built["previous_runs"] == ["old"]
    rows = _catalog(out, "new")
    assert sorted(rows) == [f"{i}.png" for i in range(4)] and {r["captioned_run"] for r in rows.values()} == {"old"}
    read_paths.clear()
    again = run.run(base + ["--run_id", "newer"])
    assert read_paths == [] and again["counts"]["carried"] == 4 and again["previous_runs"] == ["new"]


@pytest.mark.parametrize("garbage", [b"", b"{not json", b'{"run_id": "x"}'])
def test_an_unreadable_earlier_manifest_is_skipped_with_a_warning(tiny_bundle, tmp_path, garbage, caplog):
    src, out = tmp_path / "archive", str(tmp_path / "out")
    _write_pngs(src, ["a.png", "b.png"], seed=6)
    base = ["--input", str(src), "--output", out, "--model", tiny_bundle, "--incremental"]
    run.run(base + ["--run_id", "good"])
    (tmp_path / "out" / "run=broken").mkdir()
    (tmp_path / "out" / "run=broken" / "manifest.json").write_bytes(garbage)
    with caplog.at_level(logging.WARNING):
        assert run.main(base + ["--run_id", "next"]) == 0
    assert any("run=broken" in r.getMessage() for r in caplog.records)
    assert run_dirs.read_latest(out) == "next"
    assert json.loads(open(os.path.join(out, "run=next", "manifest.json")).read())["counts"]["carried"] == 2


def test_an_unreadable_catalog_falls_back_to_the_run_before(tiny_bundle, tmp_path, caplog):
    src, out = tmp_path / "archive", str(tmp_path / "out")
    _write_pngs(src, ["a.png", "b.png"], seed=7)
    base = ["--input", str(src), "--output", out, "--model", tiny_bundle, "--incremental"]
    run.run(base + ["--run_id", "one"])
    run.run(base + ["--run_id", "two"])
    for name in os.listdir(os.path.join(out, "run=two")):
        if name.startswith("catalog-"):
            open(os.path.join(out, "run=two", name), "wb").write(b"PAR1 truncated")
    with caplog.at_level(logging.WARNING):
        three = run.run(base + ["--run_id", "three"])
    assert three["previous_runs"] == ["one"] and three["counts"]["carried"] == 2
    assert any("run=two" in r.getMessage() and "catalog" in r.getMessage() for r in caplog.records)


def test_a_failed_listing_fails_the_run_and_latest_stays(tiny_bundle, tmp_path, monkeypatch, capsys):
    from batch_caption.pipeline import listing, match

    src, out = tmp_path / "archive", str(tmp_path / "out")
    _write_pngs(src, ["a.png"], seed=8)
    (tmp_path / "list.txt").write_text(str(src / "a.png") + "\n")
    base = ["--output", out, "--model", tiny_bundle]
    assert run.main(base + ["--input", str(src), "--run_id", "ok"]) == 0

    def storm(*args, **kwargs):  # the job's listing fails, after the client's retries
        raise OSError("503 Service Unavailable")

    class Storm:
        match = open = staticmethod(storm)

    monkeypatch.setattr(listing, "plan", storm)  # a directory or bucket prefix
    assert run.main(base + ["--input", str(src), "--run_id", "storm"]) == 1
    monkeypatch.setattr(match, "FileSystems", Storm)  # a glob
    monkeypatch.setattr(match, "files", types.SimpleNamespace(**{**vars(files), "open_read": storm}))  # a list file
    assert run.main(base + ["--input", str(src / "*.png"), "--run_id", "storm"]) == 1
    assert run.main(base + ["--input_list", str(tmp_path / "list.txt"), "--run_id", "storm"]) == 1
    err = capsys.readouterr().err
    assert err.count("cannot list") == 2 and err.count("cannot read --input_list") == 1
    assert run_dirs.read_latest(out) == "ok"


def test_too_many_failures_exit_3_and_latest_stays(tiny_bundle, tmp_path, capsys):
    src, out = tmp_path / "archive", str(tmp_path / "out")
    _write_pngs(src, ["a.png"], seed=9)
    base = ["--input", str(src), "--output", out, "--model", tiny_bundle, "--max_failed_fraction", "0.5"]
    assert run.main(base + ["--run_id", "fine"]) == 0
    for i in range(3):
        (src / f"bad{i}.jpg").write_bytes(b"garbage")
    assert run.main(base + ["--run_id", "bad"]) == 3
    assert "LATEST not moved" in capsys.readouterr().err
    assert run_dirs.read_latest(out) == "fine"
    assert "rejected" in json.loads(open(os.path.join(out, "run=bad", "manifest.json")).read())
    # The rejected run is not the next incremental run's baseline.
    again = run.run(base + ["--run_id", "again", "--incremental", "--max_failed_fraction", "1"])
    assert again["previous_runs"] == ["fine"]


def test_a_rerun_of_the_latest_run_points_latest_back_first(tiny_bundle, tmp_path, monkeypatch):
    src, out = tmp_path / "archive", str(tmp_path / "out")
    _write_pngs(src, ["a.png"], seed=10)
    base = ["--input", str(src), "--output", out, "--model", tiny_bundle]
    run.run(base + ["--run_id", "a"])
    run.run(base + ["--run_id", "b"])
    assert run_dirs.read_latest(out) == "b"
    seen = []
    real_clear = run_dirs.clear_run_dir

    def clear(run_dir):
        seen.append(run_dirs.read_latest(out))  # what a reader sees while the old attempt goes
        real_clear(run_dir)
        raise KeyboardInterrupt  # killed right after clearing

    monkeypatch.setattr(run_dirs, "clear_run_dir", clear)
    with pytest.raises(KeyboardInterrupt):
        run.run(base + ["--run_id", "b"])
    assert seen == ["a"] and run_dirs.read_latest(out) == "a"
    run_dirs.read_run(run_dirs.run_dir_of(out, run_dirs.read_latest(out)))  # LATEST names a complete run
    monkeypatch.setattr(run_dirs, "clear_run_dir", real_clear)
    run.run(base + ["--run_id", "b"])
    assert run_dirs.read_latest(out) == "b"


def test_a_file_over_the_limit_is_refused_from_its_size_unread(tiny_bundle, tmp_path, read_paths):
    src = tmp_path / "archive"
    _write_pngs(src, ["a.png"], seed=11)
    with open(src / "video.jpg", "wb") as f:  # 300 MB, sparse: no disk used
        f.truncate(300 * 1024 * 1024)
    manifest = run.run(["--input", str(src), "--output", str(tmp_path / "out"), "--model", tiny_bundle,
                        "--run_id", "big"])
    assert read_paths == ["a.png"]
    assert manifest["counts"]["failed_by_stage"]["read"] == 1 and manifest["counts"]["read"] == 1
    [row] = [r for n, r in _catalog(str(tmp_path / "out"), "big").items() if n == "video.jpg"]
    assert row["error"] == "FileTooLargeError" and row["size"] == 300 * 1024 * 1024


def test_names_that_are_not_utf8_are_captioned_and_round_trip(tiny_bundle, tmp_path):
    src = tmp_path / "archive"
    _write_pngs(src, ["plain.png"], seed=12)
    raw_names = [b"caf\xe9.png", b"\xff\xfe odd.png", "日本.png".encode()]
    data = (src / "plain.png").read_bytes()
    for i, raw in enumerate(raw_names):
        px = varied_images(1, 64, seed=20 + i)[0]
        Image.fromarray(px).save(os.path.join(os.fsencode(src), raw), format="PNG")
    out = str(tmp_path / "out")
    assert run.main(["--input", str(src), "--output", out, "--model", tiny_bundle, "--run_id", "u",
                     "--incremental"]) == 0
    lines = [json.loads(x) for n in os.listdir(os.path.join(out, "run=u")) if n.startswith("captions-")
             for x in open(os.path.join(out, "run=u", n), "rb").read().decode("utf-8").splitlines()]
    assert sorted(os.path.basename(os.fsencode(r["path"])) for r in lines) == sorted(raw_names + [b"plain.png"])
    rows = _catalog(out, "u")
    assert len(rows) == 4 and all(r["status"] == "captioned" for r in rows.values())
    assert rows["caf\udce9.png"]["path_bytes"] == os.path.join(os.fsencode(src), b"caf\xe9.png")
    # The next incremental run finds them all unchanged.
    again = run.run(["--input", str(src), "--output", out, "--model", tiny_bundle, "--run_id", "u2", "--incremental"])
    assert again["counts"]["carried"] == 4 and again["counts"]["read"] == 0
    assert (src / "plain.png").read_bytes() == data  # the input is left as it was
    assert _catalog(out, "u2")["plain.png"]["sha256"] == hashlib.sha256(data).hexdigest()


@pytest.mark.parametrize("where", ["local", "gcs"])
def test_two_runs_started_together_one_runs_the_other_exits_2_naming_it(tiny_bundle, tmp_path, where, request):
    import subprocess
    import sys

    src = tmp_path / "archive"
    _write_pngs(src, [f"{i}.png" for i in range(30)], seed=13)
    out = str(tmp_path / "out") if where == "local" else f"gs://{request.getfixturevalue('gcs_emulator')}/together"
    procs = {
        run_id: subprocess.Popen(
            [sys.executable, "-m", "batch_caption.run", "--input", str(src), "--output", out, "--model", tiny_bundle,
             "--run_id", run_id], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for run_id in ("left", "right")
    }
    results = {run_id: (p.wait(timeout=300), p.stderr.read()) for run_id, p in procs.items()}
    codes = sorted(code for code, _ in results.values())
    assert codes == [0, 2], results
    [winner] = [r for r, (code, _) in results.items() if code == 0]
    [(_, loser_err)] = [v for r, v in results.items() if r != winner]
    [said] = [line for line in loser_err.splitlines() if line.startswith("batch_caption.run:")]
    assert f"held by run {winner} on" in said
    assert run_dirs.read_latest(out) == winner
    done = run_dirs.read_run(run_dirs.run_dir_of(out, winner)).manifest
    assert done["counts"]["captioned"] == 30 and done["counts"]["catalog_rows"] == 30


_CHILD = ("import sys; sys.path.insert(0, sys.argv.pop(1)); import fault_fs; "
          "from batch_caption.run import main; sys.exit(main(sys.argv[1:]))")


def _child(args: list[str], **env) -> int:
    import subprocess
    import sys

    tests_dir = os.path.dirname(os.path.abspath(__file__))
    return subprocess.run([sys.executable, "-c", _CHILD, tests_dir, *args], env={**os.environ, **env},
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=300).returncode


@pytest.mark.slow
def test_a_run_killed_at_any_change_leaves_latest_readable_and_a_rerun_completes(tiny_bundle, tmp_path):
    """SIGKILL before each change a run makes to its output (every create, rename and
    delete, through a fault-injecting filesystem with object-store semantics): LATEST
    always names a run whose manifest and catalog read back, and the rerun completes."""
    import shutil
    from concurrent.futures import ThreadPoolExecutor

    import fault_fs

    src, base_dir = tmp_path / "archive", tmp_path / "base"
    _write_pngs(src, ["a.png", "b.png", "c.png"], seed=14)
    args = lambda out: ["--input", str(src), "--output", f"{fault_fs.SCHEME}://{out}", "--model", tiny_bundle,  # noqa: E731
                        "--incremental"]
    run.run(args(base_dir) + ["--run_id", "base"])
    _write_pngs(src, ["d.png"], seed=15)  # the next night has work to do
    count_file = tmp_path / "changes"
    counted = tmp_path / "counted"
    shutil.copytree(base_dir, counted)
    assert _child(args(counted) + ["--run_id", "next"], FAULT_COUNT_FILE=str(count_file)) == 0
    changes = int(count_file.read_text())
    assert changes >= 10  # lock, probe, clearing, shards, renames, manifest, LATEST, unlock

    def killed_at(k: int):
        out = tmp_path / f"kill{k}"
        shutil.copytree(base_dir, out)
        return k, out, _child(args(out) + ["--run_id", "next"], FAULT_KILL_AT=str(k))

    with ThreadPoolExecutor(2) as pool:
        outcomes = list(pool.map(killed_at, range(1, changes + 1)))
    for k, out, code in outcomes:
        assert code == -9, f"change {k}: exit {code}"
        latest = run_dirs.read_latest(str(out))
        assert latest in ("base", "next"), f"change {k}: LATEST {latest!r}"
        done = run_dirs.read_run(run_dirs.run_dir_of(str(out), latest))
        rows = pq.read_table(list(done.catalog_files), partitioning=None).num_rows
        assert rows == (3 if latest == "base" else 4), f"change {k}"
    for k, out, _ in outcomes:
        rerun = run.run(args(out) + ["--run_id", "next"])
        assert run_dirs.read_latest(str(out)) == "next" and rerun["counts"]["catalog_rows"] == 4, f"change {k}"


def test_links_and_unlistable_directories_are_accounted_in_the_run(tiny_bundle, tmp_path, monkeypatch):
    from batch_caption.pipeline import listing

    src = tmp_path / "archive"
    _write_pngs(src / "sub", ["a.png"], seed=16)
    _write_pngs(src / "locked", ["hidden.png"], seed=17)
    os.symlink(src / "sub", src / "again")  # inside the tree: counted, not listed twice
    real = os.scandir

    def scandir(path):
        if str(path).endswith("locked"):
            raise PermissionError(13, "Permission denied", str(path))
        return real(path)

    monkeypatch.setattr(listing.os, "scandir", scandir)
    manifest = run.run(["--input", str(src), "--output", str(tmp_path / "out"), "--model", tiny_bundle,
                        "--run_id", "links"])
    c = manifest["counts"]
    assert (c["captioned"], c["links_skipped"], c["failed_by_stage"]["match"]) == (1, 1, 1)


def test_files_under_an_unlistable_directory_are_carried_not_deleted(tiny_bundle, tmp_path, monkeypatch, read_paths):
    from batch_caption.pipeline import listing

    src, out = tmp_path / "archive", str(tmp_path / "out")
    _write_pngs(src / "open", ["a.png"], seed=18)
    _write_pngs(src / "locked", ["b.png", "c.png"], seed=19)
    _write_pngs(src / "locked_too", ["d.png"], seed=20)  # a sibling whose name extends it: listed
    base = ["--input", str(src), "--output", out, "--model", tiny_bundle, "--incremental"]
    run.run(base + ["--run_id", "one"])
    real = os.scandir

    def scandir(path):
        if str(path) == str(src / "locked"):
            raise PermissionError(13, "Permission denied", str(path))
        return real(path)

    monkeypatch.setattr(listing.os, "scandir", scandir)
    os.remove(src / "locked_too" / "d.png")  # really deleted
    read_paths.clear()
    two = run.run(base + ["--run_id", "two"])
    c = two["counts"]
    assert (c["unlisted"], c["deleted"], c["carried"], c["catalog_rows"]) == (2, 1, 3, 3)
    assert read_paths == [] and sorted(_catalog(out, "two")) == ["a.png", "b.png", "c.png"]
    assert _catalog(out, "two")["b.png"]["captioned_run"] == "one"
    monkeypatch.setattr(listing.os, "scandir", real)
    three = run.run(base + ["--run_id", "three"])
    assert read_paths == [] and three["counts"]["skipped"] == 3 and three["counts"]["unlisted"] == 0


def test_a_wider_filter_captions_what_is_new_to_it_and_a_narrower_one_forgets_no_caption(
        tiny_bundle, tmp_path, read_paths):
    src, out = tmp_path / "archive", str(tmp_path / "out")
    _write_pngs(src, ["a.jpg", "c.jpg", "b.png"], seed=23)  # PNG bytes: any extension of the list decodes
    (src / "corrupt.jpg").write_bytes(b"\xff\xd8\xff not really a jpeg")
    (src / "notes.txt").write_text("not an image")
    base = ["--input", str(src), "--output", out, "--model", tiny_bundle, "--incremental"]

    one = run.run(base + ["--run_id", "jpg", "--extensions", "jpg"])
    c = one["counts"]
    assert (c["captioned"], c["failed"], c["skipped_not_image"]) == (2, 1, 2)
    assert sorted(_catalog(out, "jpg")) == ["a.jpg", "c.jpg", "corrupt.jpg"]

    read_paths.clear()
    two = run.run(base + ["--run_id", "default"])  # the PNG is new to the default list
    assert read_paths == ["b.png"]
    c = two["counts"]
    assert (c["captioned"], c["carried"], c["skipped_not_image"], c["catalog_rows"]) == (1, 3, 1, 4)
    assert {n: r["captioned_run"] for n, r in _catalog(out, "default").items()} == {
        "a.jpg": "jpg", "c.jpg": "jpg", "corrupt.jpg": "jpg", "b.png": "default"}

    (src / "c.jpg").unlink()  # deleted while the filter leaves it out: gone from the catalog all the same
    read_paths.clear()
    three = run.run(base + ["--run_id", "png", "--extensions", "png"])
    assert read_paths == []
    c = three["counts"]
    assert (c["skipped_not_image"], c["carried_not_image"], c["carried"], c["deleted"], c["catalog_rows"]) == (
        3, 1, 2, 1, 2)
    rows = _catalog(out, "png")
    assert {n: r["captioned_run"] for n, r in rows.items()} == {"a.jpg": "jpg", "b.png": "default"}
    assert rows["a.jpg"] == _catalog(out, "default")["a.jpg"]  # carried unchanged

    read_paths.clear()
    four = run.run(base + ["--run_id", "again"])  # the failed file is an input again: tried again
    assert read_paths == ["corrupt.jpg"]
    c = four["counts"]
    assert (c["failed"], c["carried"], c["carried_not_image"], c["catalog_rows"]) == (1, 2, 0, 3)
    assert sorted(_catalog(out, "again")) == ["a.jpg", "b.png", "corrupt.jpg"]


def test_the_default_filter_drops_the_error_rows_of_files_that_are_not_images(tiny_bundle, tmp_path, read_paths):
    """An output whose earlier runs took every file (--all_files) holds an error row for
    each note and sidecar; the first night with the default filter drops them."""
    src, out = tmp_path / "archive", str(tmp_path / "out")
    _write_pngs(src, ["a.png"], seed=24)
    (src / "notes.txt").write_text("not an image")
    (src / "a.xmp").write_text("<x:xmpmeta/>")
    base = ["--input", str(src), "--output", out, "--model", tiny_bundle, "--incremental"]
    every = run.run(base + ["--run_id", "all", "--all_files"])
    assert every["counts"]["failed"] == 2 and len(_catalog(out, "all")) == 3
    read_paths.clear()
    images = run.run(base + ["--run_id", "images"])
    assert read_paths == [] and sorted(_catalog(out, "images")) == ["a.png"]
    c = images["counts"]
    assert (c["skipped_not_image"], c["carried_not_image"], c["carried"], c["deleted"]) == (2, 0, 1, 0)


def test_the_latest_catalog_alone_gives_every_current_caption(tiny_bundle, tmp_path):
    """What a consumer does (the README's DuckDB query, with pyarrow): read LATEST, then
    that run's catalog files, and get the current caption of every image."""
    import pyarrow.dataset as ds

    src, out = tmp_path / "archive", tmp_path / "out"
    _write_pngs(src, ["a.png", "b.png", "c.png"], seed=18)
    base = ["--input", str(src), "--output", str(out), "--model", tiny_bundle, "--incremental"]
    run.run(base + ["--run_id", "mon"])
    (src / "c.png").unlink()
    _write_pngs(src, ["d.png"], seed=19)
    run.run(base + ["--run_id", "tue"])
    latest = (out / "LATEST").read_text().strip()
    table = ds.dataset(sorted((out / f"run={latest}").glob("catalog-*.parquet")), format="parquet").to_table(
        filter=ds.field("status") == "captioned", columns=["path", "caption", "captioned_run"])
    current = {os.path.basename(r["path"]): r["captioned_run"] for r in table.to_pylist()}
    assert current == {"a.png": "mon", "b.png": "mon", "d.png": "tue"}
    records = [json.loads(x) for run_id in ("mon", "tue") for n in (out / f"run={run_id}").glob("captions-*")
               for x in n.read_text().splitlines()]
    by_path = {os.path.basename(r["path"]): r["caption"] for r in records}
    assert {os.path.basename(r["path"]): r["caption"] for r in table.to_pylist()} == {
        k: by_path[k] for k in ("a.png", "b.png", "d.png")}


def test_runs_that_end_within_one_second_are_ordered_by_their_end(tmp_path):
    out = tmp_path / "out"
    for run_id, seconds in (("zzz", 100.2), ("aaa", 100.7)):  # the later run has the smaller id
        (out / f"run={run_id}").mkdir(parents=True)
        (out / f"run={run_id}" / "manifest.json").write_text(json.dumps(
            {"run_id": run_id, "files": {"captions": []}, "end_time": "1970-01-01T00:01:40Z", "end_seconds": seconds}))
    assert [r.run_id for r in run_dirs.complete_runs(str(out))] == ["zzz", "aaa"]


def _fake_run(out, run_id: str, end: int, manifest_files=None, table=None) -> None:
    """A complete run directory whose catalog holds one captioned row (or `table`)."""
    import pyarrow as pa

    run_dir = out / f"run={run_id}"
    run_dir.mkdir(parents=True)
    name = "catalog-00000-of-00001.parquet"
    rows = [{"path": "/a.png", "size": 1, "status": "captioned", "caption": run_id, "captioned_run": run_id}]
    if table is None:
        table = pa.Table.from_pylist(rows, schema=catalog.schema())
    pq.write_table(table, run_dir / name, compression="zstd", write_page_checksum=True)
    listed = {"captions": [], "errors": [], "catalog": [name]} if manifest_files is None else manifest_files
    (run_dir / "manifest.json").write_text(json.dumps(
        {"run_id": run_id, "files": listed, "end_time": f"2026-01-0{end}T00:00:00Z", "end_seconds": end}))


def _damaged_tables():
    import pyarrow as pa

    good = pa.Table.from_pylist([{"path": "/a.png", "status": "captioned"}], schema=catalog.schema())
    return {
        "no_sha256": good.drop_columns(["sha256"]),
        "size_as_text": good.set_column(2, pa.field("size", pa.string()), pa.array(["1"])),
        "no_path_bytes": good.drop_columns(["path_bytes"]),
    }


@pytest.mark.parametrize("damage", ["no_sha256", "size_as_text", "no_path_bytes", "pages", "truncated"])
def test_a_catalog_that_does_not_read_whole_falls_back_to_the_run_before(tmp_path, caplog, damage):
    out = tmp_path / "out"
    _fake_run(out, "one", 1)
    _fake_run(out, "two", 2, table=_damaged_tables().get(damage))
    path = out / "run=two" / "catalog-00000-of-00001.parquet"
    data = bytearray(path.read_bytes())
    if damage == "pages":  # the footer reads, a data page does not
        for i in range(8, 40):
            data[i] ^= 0x5A
    elif damage == "truncated":
        data = data[:4] + data[len(data) // 2:]
    path.write_bytes(bytes(data))
    with caplog.at_level(logging.WARNING):
        chosen = run_dirs.baseline(run_dirs.complete_runs(str(out)))
    assert chosen.run_ids == ("one",) and chosen.catalog_rows == 1
    assert any("run=two" in r.getMessage() and "catalog-00000-of-00001.parquet" in r.getMessage()
               for r in caplog.records)


@pytest.mark.parametrize("listed", [
    {"catalog": 5, "captions": []}, {}, {"captions": "captions-00000-of-00001.jsonl"},
    {"captions": [], "catalog": [5]}, {"captions": [], "catalog": ["../../run=one/catalog-00000-of-00001.parquet"]},
    {"captions": [None]}, {"captions": [], "errors": {"a": 1}},
])
def test_a_manifest_with_fields_of_the_wrong_type_is_skipped_naming_it(tmp_path, caplog, listed):
    out = tmp_path / "out"
    _fake_run(out, "one", 1)
    _fake_run(out, "two", 2, manifest_files=listed)
    with caplog.at_level(logging.WARNING):
        complete = run_dirs.complete_runs(str(out))
        chosen = run_dirs.baseline(complete)
    assert [r.run_id for r in complete] == ["one"] and chosen.run_ids == ("one",)
    assert any("run=two" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("field, value", [("run_id", 7), ("end_seconds", "soon"), ("end_time", 3), ("run_id", None)])
def test_a_manifest_with_other_fields_of_the_wrong_type_is_skipped(tmp_path, field, value):
    out = tmp_path / "out"
    _fake_run(out, "one", 1)
    _fake_run(out, "two", 2)
    manifest_path = out / "run=two" / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest[field] = value
    manifest_path.write_text(json.dumps(manifest))
    assert [r.run_id for r in run_dirs.complete_runs(str(out))] == ["one"]


def test_a_damaged_catalog_in_history_never_wedges_an_incremental_run(tiny_bundle, tmp_path, caplog):
    src, out = tmp_path / "archive", str(tmp_path / "out")
    _write_pngs(src, ["a.png", "b.png"], seed=7)
    base = ["--input", str(src), "--output", out, "--model", tiny_bundle, "--incremental"]
    run.run(base + ["--run_id", "one"])
    run.run(base + ["--run_id", "two"])
    [name] = [n for n in os.listdir(os.path.join(out, "run=two")) if n.startswith("catalog-")]
    table = pq.read_table(os.path.join(out, "run=two", name)).drop_columns(["sha256"])
    pq.write_table(table, os.path.join(out, "run=two", name))
    manifest_path = os.path.join(out, "run=one", "manifest.json")
    with caplog.at_level(logging.WARNING):
        three = run.run(base + ["--run_id", "three"])
        assert three["previous_runs"] == ["one"] and three["counts"]["carried"] == 2
        with open(manifest_path) as f:
            manifest = json.load(f)
        manifest["files"]["catalog"] = 5
        with open(os.path.join(out, "run=three", "manifest.json"), "w") as f:
            json.dump(manifest | {"run_id": "three"}, f)
        four = run.run(base + ["--run_id", "four"])
    assert four["previous_runs"] == ["one"] and four["counts"]["carried"] == 2
    assert any("run=two" in r.getMessage() and name in r.getMessage() for r in caplog.records)
    assert any("run=three" in r.getMessage() for r in caplog.records)


def test_an_output_inside_the_input_is_never_read_as_input(tiny_bundle, tmp_path):
    src = tmp_path / "archive"
    _write_pngs(src / "photos", ["a.png", "b.png"], seed=21)
    out = str(src / "captions")
    listed = tmp_path / "list.txt"
    base = ["--input", str(src), "--output", out, "--model", tiny_bundle, "--max_failed_fraction", "0.1"]
    for night in ("one", "two", "three"):
        extra = ["--incremental"] if night != "one" else []
        if night == "three":  # a glob and a list naming the output's own files too
            listed.write_text(os.path.join(out, "LATEST") + "\n" + os.path.join(out, "run=one", "manifest.json") + "\n")
            extra += ["--input", str(src / "*" / "*"), "--input_list", str(listed)]
        manifest = run.run(base + extra + ["--run_id", night])
        assert manifest["counts"]["failed"] == 0 and "rejected" not in manifest
    assert sorted(_catalog(out, "three")) == ["a.png", "b.png"]


def _run_on_a_full_disk(args, limit: int):
    """The job's CLI in a process whose shard files fill the disk at `limit` bytes
    (tests/full_disk.py)."""
    import subprocess
    import sys

    tests = os.path.dirname(os.path.abspath(__file__))
    code = ("import sys; sys.path.insert(0, sys.argv.pop(1)); import full_disk; from batch_caption.run import main; "
            "sys.exit(main(sys.argv[1:]))")
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "FULL_DISK_BYTES": str(limit)}
    return subprocess.run([sys.executable, "-c", code, tests, *args], capture_output=True, text=True, timeout=600,
                          env=env)


def test_a_full_disk_fails_with_the_error_last_and_the_next_run_cleans_up(tiny_bundle, tmp_path):
    src, out = tmp_path / "archive", tmp_path / "out"
    _write_pngs(src, [f"{i}.png" for i in range(12)], seed=22)
    base = ["--input", str(src), "--output", str(out), "--model", tiny_bundle]
    full = _run_on_a_full_disk(base + ["--run_id", "full"], limit=3000)
    lines = full.stderr.strip().splitlines()
    assert full.returncode == 1, full.stderr[-3000:]
    assert lines[-1].startswith("batch_caption.run: pipeline failed:"), full.stderr[-3000:]
    assert "No space left on device" in lines[-1] and "Exception ignored" not in full.stderr, full.stderr[-3000:]
    # What a failed run leaves: its temporary files (and, here, an older one's).
    (out / "run=older" / "_temporary").mkdir(parents=True)
    (out / "run=older" / "_temporary" / "captions-0.jsonl").write_bytes(b"x" * 1000)
    assert run.main(base + ["--run_id", "next"]) == 0
    assert not list(out.glob("run=*/_temporary"))
    assert run_dirs.read_latest(str(out)) == "next"


_NIGHT = """
import json, sys
from batch_caption import run
manifest = run.run(sys.argv[1:])
loaded = any(m in sys.modules for m in ("batch_caption.model.lite", "batch_caption.model.load"))
print(json.dumps({"counts": manifest["counts"], "tensorflow": "tensorflow" in sys.modules, "model": loaded}))
"""


def test_a_night_without_changes_never_loads_the_model(tiny_bundle, tmp_path):
    """The model loads with the first file read: a night that reads nothing loads no model
    runtime, nor TensorFlow; a night with one new file loads the model (compiled for
    LiteRT by the first night: still no TensorFlow) and captions that file."""
    import subprocess
    import sys

    src, out = tmp_path / "archive", str(tmp_path / "out")
    _write_pngs(src, [f"{i}.png" for i in range(4)], seed=1)
    base = ["--input", str(src), "--output", out, "--model", tiny_bundle, "--incremental"]
    assert run.run(base + ["--run_id", "r1"])["counts"]["captioned"] == 4

    def night(run_id):
        done = subprocess.run([sys.executable, "-c", _NIGHT, *base, "--run_id", run_id], capture_output=True,
                              text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-2000:]
        return json.loads(done.stdout.strip().splitlines()[-1])

    quiet = night("r2")
    assert quiet["counts"]["read"] == 0 and quiet["counts"]["carried"] == 4
    assert not quiet["model"] and not quiet["tensorflow"]
    line = run.summary({"run_id": "r2", "counts": quiet["counts"], "elapsed_seconds": 1.0, "model": "m"})
    assert line.startswith("run=r2: 0 inputs, 0 captioned, 0 failed") and line.endswith("model m; 4 unchanged")
    _write_pngs(src, ["new.png"], seed=2)
    busy = night("r3")
    assert busy["counts"]["captioned"] == 1 and busy["model"] and not busy["tensorflow"]
