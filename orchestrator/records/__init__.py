"""The run directory: its writer and reader, run statistics, the checkpoint and resume."""
