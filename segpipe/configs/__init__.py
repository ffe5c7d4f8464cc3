"""The shipped configs (``configs/*.yaml`` in the repository, whose ``configs`` is a link to this
folder), in the wheel too: ``segpipe fit --config configs/camvid_unet.yaml`` works after a
``pip install`` as in a checkout (:func:`resolve`).

Plain files and the standard library only: read by the command line before anything heavy is
imported.
"""

from __future__ import annotations

from pathlib import Path

__all__ = ["FOLDER", "names", "resolve"]

#: Where the shipped YAML files are.
FOLDER = Path(__file__).resolve().parent


def names() -> list[str]:
    """The shipped configs' file names (``camvid_unet.yaml``, ...)."""
    return sorted(p.name for p in FOLDER.glob("*.yaml"))


def resolve(path: str) -> str | None:
    """The shipped config a ``--config`` value means when no such file exists here, else None.

    ``configs/NAME.yaml`` (as the README writes it) and a bare ``NAME.yaml`` name a shipped
    config; a path that exists, or one in another folder, is the user's own.
    """
    given = Path(path)
    if given.exists() or given.parent.as_posix() not in (".", "configs"):
        return None
    shipped = FOLDER / given.name
    return str(shipped) if shipped.is_file() else None
