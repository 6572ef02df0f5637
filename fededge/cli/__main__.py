import sys

from fededge.cli import main

sys.exit(main())
