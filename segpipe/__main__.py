"""``python -m segpipe``: the ``segpipe`` command (for an environment whose scripts folder is not
on PATH)."""

import sys

from segpipe.cli import main

if __name__ == "__main__":
    sys.argv[0] = "segpipe"  # usage lines say `segpipe fit`, not `__main__.py fit`
    sys.exit(main())
