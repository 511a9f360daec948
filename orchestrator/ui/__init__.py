"""What a person sees: the snapshot, the records' fold, the Rich render, the live dashboard,
headless log lines, ``watch`` and ``report``."""
