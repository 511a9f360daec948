"""The orchestrator: admits the testbed's devices, runs split-learning rounds, records the run."""

__version__ = "0.1.0"
