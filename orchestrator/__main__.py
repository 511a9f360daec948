"""``python -m orchestrator`` is ``gapsl-orchestrator``."""

import sys

from orchestrator.cli import main

sys.exit(main())
