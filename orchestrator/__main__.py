"""``python -m orchestrator`` is ``gapsl-orchestrator``."""

import sys

from .cli import main

sys.exit(main())
