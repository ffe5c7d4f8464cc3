"""segpipe.demos.download against a local file:// mirror (and a local HTTP server for resume)."""

from __future__ import annotations

import json
import threading
import zipfile
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from segpipe.demos import download as dl
from segpipe.demos import main as demo_main
from segpipe.demos.download import (
    MANIFEST_NAME,
    DownloadError,
    default_cache_dir,
    download,
    extract_zip,
    fetch_camvid,
    sha256_file,
    verify_camvid_tree,
)
from segpipe.fileio import TMP_PREFIX
from tests.demos.conftest import FAKE_COUNTS, make_fake_segnet_zip


def _leftovers(folder: Path) -> list[str]:
    """Names of partial downloads or temporary folders/files anywhere under ``folder``."""
    if not folder.exists():
        return []
    return sorted(p.name for p in folder.rglob("*")
                  if p.name.startswith(TMP_PREFIX) or p.name.endswith(".part"))


def test_download_file_url_verifies_sha256(fake_zip: Path, tmp_path: Path) -> None:
    dest = tmp_path / "dl" / "a.zip"
    digest = sha256_file(fake_zip)
    assert download(fake_zip.as_uri(), dest, sha256=digest, progress=False) == dest
    assert dest.read_bytes() == fake_zip.read_bytes()
    assert _leftovers(dest.parent) == []
    fake_zip.unlink()  # an existing, matching file is not fetched again
    assert download("file:///nonexistent.zip", dest, sha256=digest, progress=False) == dest


def test_download_wrong_sha256_is_deleted(fake_zip: Path, tmp_path: Path) -> None:
    dest = tmp_path / "dl" / "a.zip"
    with pytest.raises(DownloadError, match="SHA-256") as info:
        download(fake_zip.as_uri(), dest, sha256="0" * 64, progress=False)
    assert "a.zip" in str(info.value) and sha256_file(fake_zip) in str(info.value)
    assert not dest.exists() and _leftovers(dest.parent) == []


def test_download_unreachable_url_is_clear(tmp_path: Path) -> None:
    with pytest.raises(DownloadError, match="could not read file:///no/such/file.zip") as info:
        download("file:///no/such/file.zip", tmp_path / "x.zip", progress=False)
    assert "Check the path in the file:// URL" in str(info.value)
    assert "network" not in str(info.value)  # a local path: no proxy advice
    with pytest.raises(DownloadError, match="could not download http://127.0.0.1:9/x.zip") as info:
        download("http://127.0.0.1:9/x.zip", tmp_path / "x.zip", progress=False, timeout=5)
    assert "Check the network connection" in str(info.value)


def test_fetch_camvid_downloads_verifies_and_extracts(fake_zip: Path, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    root = fetch_camvid(cache, url=fake_zip.as_uri(), sha256=sha256_file(fake_zip),
                        counts=FAKE_COUNTS, progress=False)
    assert root == cache / "CamVid"
    for split, n in FAKE_COUNTS.items():
        assert len(list((root / split).glob("*.png"))) == n
        assert len(list((root / f"{split}annot").glob("*.png"))) == n
    assert (root / "train.txt").is_file()
    assert not (cache / "README.md").exists() and not (root / "README.md").exists()  # only CamVid/
    manifest = json.loads((root / MANIFEST_NAME).read_text())
    assert manifest["sha256"] == sha256_file(fake_zip) and manifest["source"] == fake_zip.as_uri()
    assert manifest["counts"] == FAKE_COUNTS
    assert sorted(p.name for p in cache.iterdir()) == ["CamVid"]  # archive removed, nothing partial


def test_fetch_camvid_reuses_verified_cache_without_fetching(
    fake_zip: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog
) -> None:
    cache = tmp_path / "cache"
    first = fetch_camvid(cache, url=fake_zip.as_uri(), counts=FAKE_COUNTS, progress=False)
    fake_zip.unlink()  # the source is gone: a second fetch would fail

    def no_fetch(*args: object, **kwargs: object) -> None:
        raise AssertionError("the verified cache must be reused without downloading")

    monkeypatch.setattr(dl, "download", no_fetch)
    with caplog.at_level("INFO", logger="segpipe.demos.download"):
        assert fetch_camvid(cache, url=fake_zip.as_uri(), counts=FAKE_COUNTS,
                            progress=False) == first
    # said so: it was "Fetching CamVid from <url>" even for a URL that no longer exists
    assert f"using the verified CamVid in {first} (fetched from {fake_zip.as_uri()}" in caplog.text


def test_fetch_camvid_refetches_an_incomplete_cache(fake_zip: Path, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    root = fetch_camvid(cache, url=fake_zip.as_uri(), counts=FAKE_COUNTS, progress=False)
    victim = sorted((root / "valannot").iterdir())[0]
    victim.unlink()
    assert fetch_camvid(cache, url=fake_zip.as_uri(), counts=FAKE_COUNTS, progress=False) == root
    assert victim.is_file() and _leftovers(cache) == []


def test_fetch_camvid_wrong_sha256_leaves_no_cache(fake_zip: Path, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    with pytest.raises(DownloadError) as info:
        fetch_camvid(cache, url=fake_zip.as_uri(), sha256="f" * 64, counts=FAKE_COUNTS,
                     progress=False)
    msg = str(info.value)
    assert "0123abcd.zip" in msg and "SHA-256" in msg
    assert f"Delete the cache folder {cache}" in msg and "retry" in msg
    assert not (cache / "CamVid").exists() and list(cache.iterdir()) == []


def test_fetch_camvid_rejects_truncated_zip(fake_zip: Path, tmp_path: Path) -> None:
    data = fake_zip.read_bytes()
    bad = tmp_path / "mirror2" / "0123abcd.zip"
    bad.parent.mkdir()
    bad.write_bytes(data[: len(data) // 2])
    cache = tmp_path / "cache"
    with pytest.raises(DownloadError, match="not a readable zip archive") as info:
        fetch_camvid(cache, url=bad.as_uri(), counts=FAKE_COUNTS, progress=False)
    assert str(cache / "0123abcd.zip") in str(info.value)
    assert f"Delete the cache folder {cache}" in str(info.value)
    assert list(cache.iterdir()) == []  # the bad archive was deleted too


def test_fetch_camvid_rejects_member_with_bad_crc(tmp_path: Path) -> None:
    archive = make_fake_segnet_zip(tmp_path / "mirror" / "crc.zip", compression=zipfile.ZIP_STORED)
    with zipfile.ZipFile(archive) as zf:
        info = next(i for i in zf.infolist() if i.filename.endswith(".png"))
    raw = bytearray(archive.read_bytes())
    # local header: 30 bytes + name + extra, then the stored data; flip a byte in the data
    name_len = int.from_bytes(raw[info.header_offset + 26: info.header_offset + 28], "little")
    extra_len = int.from_bytes(raw[info.header_offset + 28: info.header_offset + 30], "little")
    raw[info.header_offset + 30 + name_len + extra_len + 20] ^= 0xFF
    archive.write_bytes(bytes(raw))
    cache = tmp_path / "cache"
    with pytest.raises(DownloadError, match="corrupted") as info_exc:
        fetch_camvid(cache, url=archive.as_uri(), counts=FAKE_COUNTS, progress=False)
    assert info.filename in str(info_exc.value)
    assert list(cache.iterdir()) == []


def test_fetch_camvid_rejects_wrong_counts(fake_zip: Path, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    with pytest.raises(DownloadError, match=r"train holds 3 frames, expected 367") as info:
        fetch_camvid(cache, url=fake_zip.as_uri(), progress=False)  # the real counts
    assert "CamVid/train holds 3 frames" in str(info.value) and "0123abcd.zip" in str(info.value)
    assert "Delete the cache folder" in str(info.value)
    assert list(cache.iterdir()) == []


def test_fetch_camvid_rejects_unlabelled_frame(tmp_path: Path) -> None:
    def rename_label(camvid: Path) -> None:
        label = sorted((camvid / "valannot").iterdir())[0]
        label.rename(label.with_name("other.png"))

    archive = make_fake_segnet_zip(tmp_path / "mirror" / "x.zip", edit=rename_label)
    cache = tmp_path / "cache"
    with pytest.raises(DownloadError, match="has no label") as info:
        fetch_camvid(cache, url=archive.as_uri(), counts=FAKE_COUNTS, progress=False)
    assert "0001TP_000000" in str(info.value) and not (cache / "CamVid").exists()


def test_fetch_camvid_without_camvid_folder(tmp_path: Path) -> None:
    archive = tmp_path / "mirror" / "other.zip"
    archive.parent.mkdir()
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("repo-main/README.md", "hello")
    with pytest.raises(DownloadError, match="has no CamVid/ folder"):
        fetch_camvid(tmp_path / "cache", url=archive.as_uri(), counts=FAKE_COUNTS, progress=False)


def test_extract_zip_refuses_unsafe_paths(tmp_path: Path) -> None:
    archive = tmp_path / "evil.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("../evil.txt", "x")
    with pytest.raises(DownloadError, match="unsafe path"):
        extract_zip(archive, tmp_path / "out", progress=False)
    assert not (tmp_path / "evil.txt").exists() and not (tmp_path / "out").exists()
    assert _leftovers(tmp_path) == []


def test_extract_zip_replaces_atomically(fake_zip: Path, tmp_path: Path) -> None:
    dest = tmp_path / "out"
    dest.mkdir()
    (dest / "old.txt").write_text("old")

    def reject(tree: Path) -> None:
        raise DownloadError("rejected")

    with pytest.raises(DownloadError, match="rejected"):
        extract_zip(fake_zip, dest, subdir="CamVid", verify=reject, progress=False)
    assert (dest / "old.txt").is_file() and _leftovers(tmp_path) == []  # untouched
    extract_zip(fake_zip, dest, subdir="CamVid", progress=False)
    assert not (dest / "old.txt").exists() and verify_camvid_tree(dest, FAKE_COUNTS) == FAKE_COUNTS


def test_default_cache_dir(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("SEGPIPE_CACHE", str(tmp_path))
    assert default_cache_dir() == tmp_path / "camvid"
    monkeypatch.delenv("SEGPIPE_CACHE")
    assert default_cache_dir() == Path.home() / ".cache" / "segpipe" / "camvid"


class _RangeHandler(BaseHTTPRequestHandler):
    """Serves one payload with an ETag, honouring ``Range: bytes=N-`` and ``If-Range``; or
    misbehaving: ``bad_range`` answers 206 from byte 0 whatever was asked, ``no_length`` sends
    no Content-Length (the connection's end ends the body)."""

    payload = b""
    etag = '"v1"'
    bad_range = False
    no_length = False
    short_206 = 0  # answer a range with at most this many bytes (a valid partial 206)
    chunked_cut = False  # a chunked 200 that stops after its first chunk
    ranges: list[tuple[str, str | None]] = []

    def do_GET(self) -> None:  # noqa: N802 - http.server API
        rng, if_range = self.headers.get("Range"), self.headers.get("If-Range")
        start, end = 0, len(self.payload)
        if rng:
            type(self).ranges.append((rng, if_range))
        if rng and (if_range is None or if_range == self.etag):
            start = 0 if self.bad_range else int(rng.split("=")[1].rstrip("-"))
            end = min(end, start + self.short_206) if self.short_206 else end
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{end - 1}/{len(self.payload)}")
        else:
            self.send_response(200)
        body = self.payload[start:end]
        self.send_header("ETag", self.etag)
        if self.chunked_cut:
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            self.wfile.write(b"%x\r\n%s\r\n" % (1000, body[:1000]))  # no last chunk
            self.close_connection = True
            return
        if not self.no_length:
            self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
        self.close_connection = True

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture()
def serve(fake_zip: Path):
    """``serve(**handler attributes)`` -> (URL of the fake zip, handler class)."""
    servers = []

    def start(**attrs: object) -> tuple[str, type]:
        handler = type("Handler", (_RangeHandler,), {
            "payload": fake_zip.read_bytes(), "ranges": [], **attrs})
        try:
            server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        except OSError as exc:  # pragma: no cover - sandbox without sockets
            pytest.skip(f"cannot open a local HTTP server: {exc}")
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        return f"http://127.0.0.1:{server.server_address[1]}/a.zip", handler

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()


def _interrupted(dest: Path, data: bytes, url: str | None = None, validator: str = '"v1"') -> None:
    """A .part as an interrupted download leaves it (with its record when ``url`` is given)."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    (dest.parent / (dest.name + ".part")).write_bytes(data)
    if url is not None:
        (dest.parent / (dest.name + ".part.json")).write_text(
            json.dumps({"url": url, "validator": validator}))


def test_download_resumes_partial_http_download(fake_zip: Path, tmp_path: Path, serve) -> None:
    payload = fake_zip.read_bytes()
    url, handler = serve()
    dest, half = tmp_path / "dl" / "a.zip", len(payload) // 2
    _interrupted(dest, payload[:half], url)
    download(url, dest, sha256=sha256_file(fake_zip), progress=False)
    assert dest.read_bytes() == payload
    assert handler.ranges == [(f"bytes={half}-", '"v1"')]  # the rest of the same file only
    assert _leftovers(dest.parent) == [] and not (dest.parent / "a.zip.part.json").exists()
    # A first download records the ETag beside the .part while it runs.
    dest.unlink()
    seen = {}
    real = dl.atomic_write_json
    dl.atomic_write_json = lambda path, obj: (seen.update(obj), real(path, obj))
    try:
        download(url, dest, progress=False)
    finally:
        dl.atomic_write_json = real
    assert seen == {"url": url, "validator": '"v1"'} and dest.read_bytes() == payload


@pytest.mark.parametrize("case", ["unknown part", "file changed", "206 from byte 0"])
def test_download_never_splices_another_files_bytes(case: str, fake_zip: Path, tmp_path: Path,
                                                    serve) -> None:
    """A stale .part (of another file version, or of unknown origin) and a 206 answer that does
    not continue where the .part ends were spliced in and committed without a hash."""
    payload = fake_zip.read_bytes()
    url, handler = serve(etag='"v2"' if case == "file changed" else '"v1"',
                         bad_range=case == "206 from byte 0")
    dest = tmp_path / "dl" / "a.zip"
    stale = b"x" * 1000  # not the payload's first bytes
    _interrupted(dest, stale if case != "206 from byte 0" else payload[:1000],
                 None if case == "unknown part" else url)
    download(url, dest, progress=False)  # no SHA-256: only the transfer protects the file
    assert dest.read_bytes() == payload
    assert handler.ranges == ([] if case == "unknown part" else [("bytes=1000-", '"v1"')])


def test_a_partial_206_or_a_cut_chunked_answer_is_resumed_not_committed(
        fake_zip: Path, tmp_path: Path, serve) -> None:
    """A 206 of fewer bytes than the rest of the file was committed as the whole file; a
    chunked answer cut short was an http.client.IncompleteRead traceback."""
    payload = fake_zip.read_bytes()
    url, _ = serve(short_206=100)
    dest = tmp_path / "dl" / "a.zip"
    _interrupted(dest, payload[:1000], url)
    with pytest.raises(DownloadError, match=rf"incomplete: got 1100 of {len(payload)} bytes"):
        download(url, dest, progress=False)
    assert not dest.exists() and (dest.parent / "a.zip.part").stat().st_size == 1100
    url, _ = serve(chunked_cut=True)
    with pytest.raises(DownloadError, match="stopped after 1000 bytes .* run the same command "
                                            "again to resume it"):
        download(url, tmp_path / "dl2" / "a.zip", progress=False)


def test_download_without_a_length_is_warned_about(fake_zip: Path, tmp_path: Path, serve,
                                                   caplog) -> None:
    url, _ = serve(no_length=True)
    dest = tmp_path / "dl" / "a.zip"
    with caplog.at_level("WARNING", logger="segpipe.demos.download"):
        download(url, dest, progress=False)
    assert "announces no length and no SHA-256 was given" in caplog.text
    assert dest.read_bytes() == fake_zip.read_bytes()
    caplog.clear()
    dest.unlink()
    with caplog.at_level("WARNING", logger="segpipe.demos.download"):
        download(url, dest, sha256=sha256_file(fake_zip), progress=False)
    assert "announces no length" not in caplog.text  # the hash checks it


def test_download_on_a_full_disk_keeps_the_part_and_says_so(
    fake_zip: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, serve
) -> None:
    import errno
    import os

    dest = tmp_path / "dl" / "a.zip"
    real_write = os.write
    left = {"n": 1000}

    def write(fd: int, data: object) -> int:  # the disk takes 1000 bytes, then a short write
        n = min(len(data), left["n"])  # type: ignore[arg-type]
        left["n"] -= n
        if n == 0:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_write(fd, bytes(memoryview(data)[:n]))  # type: ignore[arg-type]

    monkeypatch.setattr(os, "write", write)
    url, _ = serve()
    with pytest.raises(DownloadError) as info:
        download(url, dest, progress=False)
    monkeypatch.undo()
    msg = str(info.value)
    assert msg.startswith("no space left on the device to download") and str(dest.parent) in msg
    assert "free some space" in msg and "a.zip.part is kept" in msg
    # (the .part.json record that lets it resume took some of the 1000 bytes)
    assert not dest.exists() and 0 < (dest.parent / "a.zip.part").stat().st_size <= 1000
    assert download(url, dest, sha256=sha256_file(fake_zip), progress=False) == dest
    assert _leftovers(dest.parent) == []
    # A file:// copy does not resume: its part would only take room on the full disk.
    dest.unlink()
    left["n"] = 1000
    monkeypatch.setattr(os, "write", write)
    with pytest.raises(DownloadError) as info:
        download(fake_zip.as_uri(), dest, progress=False)
    monkeypatch.undo()
    assert "run the same command again to read it again from the start" in str(info.value)
    assert "is kept" not in str(info.value) and _leftovers(dest.parent) == []


def test_fetch_camvid_full_disk_while_extracting_keeps_the_archive(
    fake_zip: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import errno
    import os
    import shutil

    cache = tmp_path / "cache"
    real_copy = shutil.copyfileobj
    calls = {"n": 0}

    def copy(src: object, dst: object, length: int = 0) -> None:
        calls["n"] += 1
        if calls["n"] == 3:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real_copy(src, dst, length)  # type: ignore[arg-type]

    monkeypatch.setattr(shutil, "copyfileobj", copy)
    with pytest.raises(DownloadError) as info:
        fetch_camvid(cache, url=fake_zip.as_uri(), counts=FAKE_COUNTS, progress=False)
    monkeypatch.undo()
    msg = str(info.value)
    assert msg.startswith("no space left on the device to extract") and "archive is kept" in msg
    assert "corrupted" not in msg and "deleted" not in msg
    assert sorted(p.name for p in cache.iterdir()) == ["0123abcd.zip"]  # no partial folder
    fake_zip.unlink()  # the rerun needs no network: the archive is reused
    root = fetch_camvid(cache, url=fake_zip.as_uri(), counts=FAKE_COUNTS, progress=False)
    probe = tmp_path / "probe"
    probe.mkdir()
    assert root.stat().st_mode & 0o777 == probe.stat().st_mode & 0o777  # not mkdtemp's 0700


def test_fetch_camvid_takes_a_local_path(fake_zip: Path, tmp_path: Path,
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """A plain path (a relative one, as typed) was a ValueError traceback from urllib."""
    monkeypatch.chdir(fake_zip.parent)
    cache = tmp_path / "cache"
    root = fetch_camvid(cache, url=fake_zip.name, counts=FAKE_COUNTS, progress=False)
    assert json.loads((root / MANIFEST_NAME).read_text())["source"] == fake_zip.as_uri()
    assert fake_zip.is_file()  # the source is not touched
    with pytest.raises(DownloadError, match=r"^s3://bucket/x\.zip is not a URL segpipe can "
                                            r"fetch: give an https:// or http:// URL"):
        download("s3://bucket/x.zip", tmp_path / "x.zip", progress=False)


@pytest.mark.parametrize("how", ["path", "file_url"])
def test_fetch_camvid_never_deletes_the_users_archive_in_the_cache(
        how: str, fake_zip: Path, tmp_path: Path) -> None:
    """An archive put in the cache by hand and named by --url was deleted after extraction,
    and on a wrong --sha256 deleted before its "download" from itself failed."""
    cache = tmp_path / "cache"
    cache.mkdir()
    own = cache / "mine.zip"
    own.write_bytes(fake_zip.read_bytes())
    url = str(own) if how == "path" else own.as_uri()
    with pytest.raises(DownloadError, match="It is your file and is left as it is"):
        fetch_camvid(cache, url=url, sha256="0" * 64, counts=FAKE_COUNTS, progress=False)
    assert own.is_file() and not (cache / "CamVid").exists()
    with pytest.raises(DownloadError, match="It is your file and is left as it is"):
        fetch_camvid(cache, url=url, counts={**FAKE_COUNTS, "train": 99}, progress=False)
    assert own.is_file()
    root = fetch_camvid(cache, url=url, sha256=sha256_file(own), counts=FAKE_COUNTS,
                        progress=False)
    assert own.is_file() and sorted(p.name for p in cache.iterdir()) == ["CamVid", "mine.zip"]
    assert len(list((root / "train").glob("*.png"))) == FAKE_COUNTS["train"]


def test_download_options_without_download_are_refused(tmp_path: Path, capsys) -> None:
    """--url, --sha256 and --cache beside --data_dir were ignored without a word."""
    with pytest.raises(SystemExit) as info:
        demo_main(["driving", "--data_dir", str(tmp_path), "--url", "file:///x.zip",
                   "--cache", str(tmp_path / "c"), "--output", str(tmp_path / "out")])
    assert info.value.code == 2 and not (tmp_path / "out").exists()
    assert "--url, --cache go with --download, which fetches CamVid" in capsys.readouterr().err
