"""``python -m edge_agent`` is ``gapsl-agent``."""

import sys

from .cli import main

sys.exit(main())
