"""``python -m medseg.viewer --url URL --model NAME [--port 8090]``."""

import sys

from medseg.viewer.cli import main

sys.exit(main())
