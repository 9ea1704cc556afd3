"""Errors a user can fix. Their message says what was wrong and what to do; the CLI prints it as one line.

`UserError` is a `ValueError`, so `except ValueError` written for diffusers still catches a bad argument, and a file
or folder that is not there is also a `FileNotFoundError`.
"""


class UserError(ValueError):
    """Bad input from the user: a wrong size, a missing file, an unknown layout, a mismatched LoRA."""


class WeightsError(UserError):
    """A checkpoint that cannot be loaded as asked: wrong layout, wrong family, missing or mis-shaped keys."""


class MissingFileError(UserError, FileNotFoundError):
    """A file or folder the user named that is not there."""


class MissingWeightsError(WeightsError, MissingFileError):
    """A checkpoint file or folder that is not there."""


class MissingExtraError(UserError, ImportError):
    """A feature whose optional dependencies are not installed; the message names the extra that installs them."""

    def __init__(self, feature: str, extra: str):
        super().__init__(f"{feature} needs the {extra} extra: pip install 'featherflux[{extra}]'")
