"""Listing trees in pieces: every entry accounted for, symlinks loop-safe, placeholders ignored."""

from __future__ import annotations

import os

import pytest
from helpers import special_files, within

from batch_caption.core.elements import SourceFile
from batch_caption.pipeline import listing


def _everything(pattern: str, output: str | None = None) -> list:
    """What listing a tree gives: the plan's items, each piece listed in place."""
    out = []
    for item in listing.plan(pattern, output):
        out.extend(listing.list_piece(item, output) if isinstance(item, listing.Piece) else [item])
    return out


def _tree(tmp_path):
    top = tmp_path / "archive"
    (top / "a" / "b").mkdir(parents=True)
    (top / "top.png").write_bytes(b"1")
    (top / "a" / "one.png").write_bytes(b"22")
    (top / "a" / "b" / "two.png").write_bytes(b"333")
    outside = tmp_path / "elsewhere"
    (outside / "deeper").mkdir(parents=True)
    (outside / "far.png").write_bytes(b"4444")
    os.symlink(top / "a", top / "link_inside")  # its files are listed under a/: skipped
    os.symlink(outside, top / "a" / "link_outside")  # followed
    os.symlink(top, outside / "deeper" / "back_home")  # a loop back into the tree: skipped
    os.symlink(outside, outside / "deeper" / "loop")  # a loop outside: each real directory once
    os.symlink(tmp_path / "nothing", top / "dangling.png")
    os.mkfifo(top / "pipe")
    return top


def test_a_tree_lists_every_file_once_and_accounts_for_the_rest(tmp_path):
    top = _tree(tmp_path)
    found = _everything(os.path.join(str(top), "**"))
    files = {os.path.relpath(f.path, top): f for f in found if isinstance(f, SourceFile)}
    assert sorted(files) == ["a/b/two.png", "a/link_outside/far.png", "a/one.png", "dangling.png", "top.png"]
    assert files["a/b/two.png"].size == 3 and files["a/b/two.png"].modified == os.stat(top / "a/b/two.png").st_mtime
    assert files["dangling.png"].size is None  # reading it gives its error record
    skipped = sorted(os.path.relpath(s.path, tmp_path) for s in found if isinstance(s, listing.SkippedLink))
    assert skipped == ["archive/a/link_outside/deeper/back_home", "archive/a/link_outside/deeper/loop",
                       "archive/link_inside"]
    assert [os.path.basename(n.path) for n in found if isinstance(n, listing.NotAFile)] == ["pipe"]


def test_the_plan_holds_one_level_and_pieces_hold_the_rest(tmp_path):
    top = _tree(tmp_path)
    planned = list(listing.plan(os.path.join(str(top), "**")))
    pieces = [p for p in planned if isinstance(p, listing.Piece)]
    assert sorted(os.path.basename(p.path) for p in pieces) == ["a"]
    assert not any(isinstance(f, SourceFile) and os.sep + "a" + os.sep in f.path for f in planned)


def test_a_subdirectory_that_cannot_be_listed_is_an_error_and_the_top_fails(tmp_path, monkeypatch):
    top = _tree(tmp_path)
    real = os.scandir

    def scandir(path):
        if str(path).endswith(os.sep + "b") or str(path) == str(top / "gone"):
            raise PermissionError(13, "Permission denied", str(path))
        return real(path)

    monkeypatch.setattr(listing.os, "scandir", scandir)
    found = _everything(os.path.join(str(top), "**"))
    [bad] = [u for u in found if isinstance(u, listing.Unlistable)]
    assert bad.path == str(top / "a" / "b") and isinstance(bad.error, PermissionError)
    (top / "gone").mkdir()
    with pytest.raises(PermissionError):
        list(listing.plan(os.path.join(str(top / "gone"), "**")))


def test_which_patterns_are_trees(tmp_path):
    assert listing.tree_of(os.path.join(str(tmp_path), "**")) == "local"
    assert listing.tree_of(os.path.join(str(tmp_path), "*.png")) is None
    assert listing.tree_of("gs://bucket/photos/**") == "gcs" and listing.tree_of("gs://bucket/**") == "gcs"
    assert listing.tree_of("gs://bucket/p*/**") is None


def test_a_bucket_prefix_is_listed_by_sub_prefix_without_placeholders(gcs_emulator):
    from batch_caption.storage import gcs

    bucket = gcs.client().bucket(gcs_emulator)
    for name in ("tree/top.png", "tree/x/", "tree/x/one.png", "tree/x/y/two.png", "tree/z/three.png"):
        bucket.blob(name).upload_from_string(b"" if name.endswith("/") else b"data")
    planned = list(listing.plan(f"gs://{gcs_emulator}/tree/**"))
    assert sorted(p.path for p in planned if isinstance(p, listing.Piece)) == ["tree/x/", "tree/z/"]
    found = _everything(f"gs://{gcs_emulator}/tree/**")
    assert sorted(f.path for f in found) == [f"gs://{gcs_emulator}/tree/{n}" for n in
                                             ("top.png", "x/one.png", "x/y/two.png", "z/three.png")]
    assert all(f.size == 4 and f.modified for f in found)


def test_symlinks_to_fifos_devices_and_sockets_are_not_files(tmp_path):
    top = tmp_path / "archive"
    top.mkdir()
    special = special_files(top)
    found = within(20, _everything, os.path.join(str(top), "**"))
    kinds = {os.path.basename(n.path): n.kind for n in found if isinstance(n, listing.NotAFile)}
    assert kinds == {"fifo.png": "a FIFO (named pipe)", "fifo_link.png": "a FIFO (named pipe)",
                     "zero_link.png": "a character device", "socket.png": "a socket"}
    assert not [f for f in found if isinstance(f, SourceFile)]
    assert special  # dir.png is listed (empty); dir_link.png leads inside: skipped


def test_a_symlink_to_an_ancestor_of_the_tree_is_not_followed(tmp_path):
    top = tmp_path / "archive"
    (top / "a").mkdir(parents=True)
    (top / "a" / "one.png").write_bytes(b"1")
    (tmp_path / "sibling_out").mkdir()
    (tmp_path / "sibling_out" / "_LOCK").write_bytes(b"{}")
    os.symlink(tmp_path, top / "a" / "up")  # the tree's parent: the tree again, and its siblings
    os.symlink(top, top / "a" / "self")
    os.symlink("/", top / "root")
    found = _everything(os.path.join(str(top), "**"))
    assert [os.path.relpath(f.path, top) for f in found if isinstance(f, SourceFile)] == ["a/one.png"]
    assert sorted(os.path.relpath(s.path, top) for s in found if isinstance(s, listing.SkippedLink)) == [
        "a/self", "a/up", "root"]


@pytest.mark.parametrize("link", [False, True])
def test_the_output_inside_the_tree_is_never_listed(tmp_path, link):
    top = _tree(tmp_path)
    out = top / "a" / "out"
    (out / "run=x").mkdir(parents=True)
    (out / "_LOCK").write_bytes(b"{}")
    (out / "run=x" / "manifest.json").write_bytes(b"{}")
    output = str(out)
    if link:  # named through a symlink: the same directory
        os.symlink(out, tmp_path / "out_link")
        output = str(tmp_path / "out_link")
    found = _everything(os.path.join(str(top), "**"), output)
    assert not [f for f in found if "out" in os.path.relpath(f.path, top).split(os.sep)]
    assert sorted(os.path.relpath(f.path, top) for f in found if isinstance(f, SourceFile)) == [
        "a/b/two.png", "a/link_outside/far.png", "a/one.png", "dangling.png", "top.png"]
    outside = listing.Outside(output)
    assert not outside(str(out / "_LOCK")) and outside(str(top / "top.png"))
    remote = listing.Outside("gs://bucket/photos/out")
    assert not remote("gs://bucket/photos/out/_LOCK") and remote("gs://bucket/photos/outline.png")
