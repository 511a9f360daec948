"""What a person sees: the snapshot (``snapshot``), the records' fold into it (``fold``), its
Rich render (``render``), the live dashboard (``live``), headless log lines (``log_lines``),
``watch`` (tailing a run directory), and ``report`` with its ``plots``."""
