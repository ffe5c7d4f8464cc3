"""``segpipe demo`` (segpipe.demos.main): what reaches the demos from the command line, and the
exit codes and one-line messages of their errors."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from segpipe.demos import main as demo_main


def _record(monkeypatch: pytest.MonkeyPatch, module: str, name: str,
            raises: BaseException | None = None) -> list[dict[str, Any]]:
    """Replace ``module.name`` (a demo's run function) by one that records its arguments."""
    import importlib

    calls: list[dict[str, Any]] = []

    def fake(*args: Any, **kwargs: Any) -> None:
        calls.append({"args": args, **kwargs})
        if raises is not None:
            raise raises

    monkeypatch.setattr(importlib.import_module(module), name, fake)
    return calls


def test_mri_gets_the_minutes_and_a_4_minute_default(tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    calls = _record(monkeypatch, "segpipe.demos.mri", "run_mri_demo")
    assert demo_main(["mri", "--output", str(tmp_path / "o"), "--minutes", "2.5"]) == 0
    assert demo_main(["mri", "--output", str(tmp_path / "o"), "--smoke"]) == 0
    assert calls[0]["max_minutes"] == 2.5 and calls[0]["smoke"] is False
    assert calls[1]["max_minutes"] == 4.0 and calls[1]["smoke"] is True


def test_driving_gets_its_options_and_a_30_minute_default(tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """An upper-case --sha256 is a valid hash; every download option reaches the demo."""
    calls = _record(monkeypatch, "segpipe.demos.driving", "run_driving_demo")
    digest = "ABCDEF0123456789" * 4
    assert demo_main(["driving", "--download", "--cache", str(tmp_path / "c"), "--url",
                      "file:///m.zip", "--sha256", digest, "--output", str(tmp_path / "o")]) == 0
    assert calls[0]["max_minutes"] == 30.0 and calls[0]["download"] is True
    assert (calls[0]["cache"], calls[0]["url"], calls[0]["sha256"]) == (
        tmp_path / "c", "file:///m.zip", digest)


@pytest.mark.parametrize("digest", ["0" * 63, "0" * 40, "0" * 65, "g" * 64])
def test_a_hash_that_is_not_64_hex_digits_is_refused(digest: str, tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    """A short (e.g. SHA-1) or long hash is refused up front, before any download."""
    calls = _record(monkeypatch, "segpipe.demos.driving", "run_driving_demo")
    with pytest.raises(SystemExit) as info:
        demo_main(["driving", "--download", "--cache", str(tmp_path / "c"), "--sha256", digest])
    assert info.value.code == 2 and not calls
    assert "--sha256 must be 64 hexadecimal digits" in capsys.readouterr().err


def test_a_failed_download_exits_1_with_one_line(monkeypatch: pytest.MonkeyPatch,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    """A download that fails verification is exit code 1 (bad data: 2)."""
    from segpipe.demos.download import DownloadError

    _record(monkeypatch, "segpipe.demos.driving", "run_driving_demo",
            raises=DownloadError("archive corrupted"))
    assert demo_main(["driving", "--download"]) == 1
    assert capsys.readouterr().err.strip() == "segpipe demo driving: error: archive corrupted"


def test_the_download_hint_follows_data_errors_only(monkeypatch: pytest.MonkeyPatch,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    """With --download, "delete the cache" is said for a damaged frame, not for an error that
    has nothing to do with the downloaded files."""
    from segpipe.data.io import ImageReadError
    from segpipe.errors import ConfigError

    _record(monkeypatch, "segpipe.demos.driving", "run_driving_demo",
            raises=ConfigError("model.loss: 'x' is not a loss"))
    assert demo_main(["driving", "--download"]) == 2
    err = capsys.readouterr().err
    assert "model.loss: 'x' is not a loss" in err and "the frames are the download's" not in err
    _record(monkeypatch, "segpipe.demos.driving", "run_driving_demo",
            raises=ImageReadError(Path("f.png"), "file is truncated"))
    assert demo_main(["driving", "--download"]) == 2
    assert "the frames are the download's" in capsys.readouterr().err
