"""The program that runs on a lab device: wire protocol, connection, client-partition training.

Importing this package pulls in nothing heavy; torch and websockets load only where used.
"""

__version__ = "0.1.0"
