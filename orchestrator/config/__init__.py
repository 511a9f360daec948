"""The testbed manifest: `testbed.toml` read into frozen dataclasses, one per section.

``manifest`` loads and checks a manifest (every error names its key), ``sections`` declares the
sections and their keys, ``toml_out`` writes a resolved manifest back as TOML, ``values`` holds the
TOML value quoting they share.
"""
