"""segpipe.demos.download: checksums, archive layouts and cache reuse, against local files only."""

from __future__ import annotations

import json
import threading
import zipfile
from http.server import ThreadingHTTPServer
from pathlib import Path

import pytest

from segpipe.demos.download import (
    MANIFEST_NAME,
    ChecksumError,
    DownloadError,
    download,
    extract_zip,
    fetch_camvid,
    sha256_file,
    verify_camvid_tree,
)
from tests.data.synthetic import make_camvid_like
from tests.demos.conftest import FAKE_COUNTS
from tests.demos.test_download import _interrupted, _RangeHandler


def test_an_upper_case_sha256_is_accepted(fake_zip: Path, tmp_path: Path) -> None:
    """A hash pasted in upper case (as some tools print it) verifies the same file."""
    dest = tmp_path / "dl" / "a.zip"
    digest = sha256_file(fake_zip).upper()
    assert download(fake_zip.as_uri(), dest, sha256=digest, progress=False) == dest
    assert dest.read_bytes() == fake_zip.read_bytes()
    fake_zip.unlink()  # the existing, matching file is kept without fetching it again
    assert download(fake_zip.as_uri(), dest, sha256=digest, progress=False) == dest


def test_absolute_member_paths_are_refused(tmp_path: Path) -> None:
    """An archive member with an absolute path must not be written outside the destination."""
    outside = tmp_path / "outside" / "evil.txt"
    archive = tmp_path / "evil.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr(outside.as_posix(), "x")
    assert zipfile.ZipFile(archive).namelist() == [outside.as_posix()]  # stored absolute
    with pytest.raises(DownloadError, match="unsafe path"):
        extract_zip(archive, tmp_path / "out", progress=False)
    assert not outside.exists() and not (tmp_path / "out").exists()


def test_a_camvid_folder_at_the_archives_top_level_is_extracted(tmp_path: Path) -> None:
    """A mirror zipped as ``CamVid/...`` (no ``<repo>-<ref>/`` wrapper) is found too."""
    src = make_camvid_like(tmp_path / "src" / "CamVid", n_train=FAKE_COUNTS["train"],
                           n_val=FAKE_COUNTS["val"], n_test=FAKE_COUNTS["test"], size=(8, 8),
                           image_ext=".png")
    archive = tmp_path / "mirror" / "camvid.zip"
    archive.parent.mkdir()
    with zipfile.ZipFile(archive, "w") as zf:
        for f in sorted(src.rglob("*")):
            zf.write(f, f.relative_to(src.parent).as_posix())
    root = fetch_camvid(tmp_path / "cache", url=archive.as_uri(), counts=FAKE_COUNTS,
                        progress=False)
    assert verify_camvid_tree(root, FAKE_COUNTS) == FAKE_COUNTS


def test_hidden_files_beside_the_frames_are_not_counted(tmp_path: Path) -> None:
    """macOS ``._name.png`` companions (left by zipping on a Mac) are not extra frames."""
    root = make_camvid_like(tmp_path / "CamVid", n_train=FAKE_COUNTS["train"],
                            n_val=FAKE_COUNTS["val"], n_test=FAKE_COUNTS["test"], size=(8, 8),
                            image_ext=".png")
    for folder in ("train", "trainannot"):
        first = sorted((root / folder).iterdir())[0]
        (root / folder / f"._{first.name}").write_bytes(b"\0" * 8)
    assert verify_camvid_tree(root, FAKE_COUNTS) == FAKE_COUNTS


def test_a_cache_verified_for_another_sha256_is_not_reused(fake_zip: Path,
                                                          tmp_path: Path) -> None:
    """Asking for a different archive hash than the cached copy was verified with fetches
    and checks again instead of silently returning the old copy."""
    cache = tmp_path / "cache"
    fetch_camvid(cache, url=fake_zip.as_uri(), sha256=sha256_file(fake_zip),
                 counts=FAKE_COUNTS, progress=False)
    with pytest.raises(ChecksumError, match="SHA-256"):
        fetch_camvid(cache, url=fake_zip.as_uri(), sha256="0" * 64, counts=FAKE_COUNTS,
                     progress=False)


def test_keep_archive_keeps_the_verified_download(fake_zip: Path, tmp_path: Path) -> None:
    """``keep_archive=True`` leaves the downloaded zip in the cache beside ``CamVid``."""
    cache = tmp_path / "cache"
    fetch_camvid(cache, url=fake_zip.as_uri(), counts=FAKE_COUNTS, keep_archive=True,
                 progress=False)
    assert sorted(p.name for p in cache.iterdir()) == ["0123abcd.zip", "CamVid"]
    assert sha256_file(cache / "0123abcd.zip") == sha256_file(fake_zip)


def test_a_cache_verified_with_an_upper_case_sha256_is_reused(fake_zip: Path,
                                                             tmp_path: Path) -> None:
    """``--sha256`` takes upper-case digits: the cache verified with such a hash records it in
    lower case and is reused on the next run with the same hash, with no download."""
    cache = tmp_path / "cache"
    digest = sha256_file(fake_zip)
    root = fetch_camvid(cache, url=fake_zip.as_uri(), sha256=digest.upper(),
                        counts=FAKE_COUNTS, progress=False)
    assert json.loads((root / MANIFEST_NAME).read_text())["sha256"] == digest
    fake_zip.unlink()  # the source is gone: only the cache can answer
    assert fetch_camvid(cache, url=fake_zip.as_uri(), sha256=digest.upper(),
                        counts=FAKE_COUNTS, progress=False) == root


def test_a_part_left_by_another_url_is_not_resumed(fake_zip: Path, tmp_path: Path) -> None:
    """A ``.part`` recorded for another URL is not continued with this URL's bytes, even when
    the server's ETag happens to be the same: the download starts over."""
    payload = fake_zip.read_bytes()
    handler = type("Handler", (_RangeHandler,), {"payload": payload, "ranges": []})
    try:
        server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    except OSError as exc:  # pragma: no cover - sandbox without sockets
        pytest.skip(f"cannot open a local HTTP server: {exc}")
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/a.zip"
        dest = tmp_path / "dl" / "a.zip"
        _interrupted(dest, b"x" * 1000, url.replace("/a.zip", "/other.zip"))
        download(url, dest, progress=False)
    finally:
        server.shutdown()
        server.server_close()
    assert dest.read_bytes() == payload and handler.ranges == []
