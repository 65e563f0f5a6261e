"""Errors of the control plane."""

from __future__ import annotations


class CliError(Exception):
    """A problem the user can fix; the CLI prints it on one line and exits 1."""
