"""``python -m segpipe``: the ``segpipe`` command (for an environment whose scripts folder is not
on PATH)."""

import sys

from segpipe.cli import main

if __name__ == "__main__":
    sys.exit(main())
