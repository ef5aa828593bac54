"""Errors of the client tools. The client package must not import the server's packages, so it has
its own small family instead of ``services.errors``: each message tells the user what to fix."""

from __future__ import annotations


class ClientError(Exception):
    """Base of the client tools' errors."""


class InvalidInput(ClientError, ValueError):
    """A bad argument, config value or input file (a ``ValueError``)."""


class MissingPackage(ClientError, ImportError):
    """An optional package a feature needs is not installed (an ``ImportError``)."""
