"""``python -m fededge.build``: the same command as ``fededge model build``."""

import sys

from fededge.cli import main

sys.exit(main(["model", "build", *sys.argv[1:]]))
