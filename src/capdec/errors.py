"""Exception types a user can act on. The CLI prints their message and exits with status 2."""

from __future__ import annotations


class CapdecError(Exception):
    """Base class of every error capdec raises on purpose (bad input, mismatch, failed run)."""


class InputError(CapdecError, ValueError):
    """A user-supplied file or option is invalid; the message names the file (and line).

    ``options``: the config fields (or the planner's inputs, e.g. ``use_offset``) whose values the check refused
    (a config's own checks and the planner's checks of combinations set them), so that a caller knows where those
    values came from (e.g. ``capdec train --config FILE`` names the file).
    """

    def __init__(self, *args: object, options: tuple[str, ...] = ()):
        super().__init__(*args)
        self.options = tuple(options)


class TrainingError(CapdecError, RuntimeError):
    """Training cannot continue (NaN loss, nothing to train on); the last good checkpoint is kept."""
