"""The round loop and what it drives: the job, the device-group seam, the in-process devices,
the latency model and scheduler, and tensor transfer to the server's device."""
