"""``python -m medseg``: the same command line as the ``medseg`` script."""

import sys

from medseg.cli import main

if __name__ == "__main__":
    sys.exit(main())
