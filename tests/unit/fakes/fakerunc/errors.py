"""The fake runc's error."""


class RuncError(Exception):
    """What runc would log at level error before exiting 1."""
