"""Exception types a user can act on. The CLI prints their message and exits with status 2."""

from __future__ import annotations


class CapdecError(Exception):
    """Base class of every error capdec raises on purpose (bad input, mismatch, failed run)."""


class InputError(CapdecError, ValueError):
    """A user-supplied file or option is invalid; the message names the file (and line)."""


class TrainingError(CapdecError, RuntimeError):
    """Training cannot continue (NaN loss, nothing to train on); the last good checkpoint is kept."""
