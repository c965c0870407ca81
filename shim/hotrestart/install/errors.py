"""The installer's one error: something it will not do, said in a line an administrator can act on."""

from __future__ import annotations


class InstallError(Exception):
    """An install or uninstall step refused or failed; nothing past the step was changed."""
