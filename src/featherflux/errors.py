"""Errors a user can fix. Their message says what was wrong and what to do; the CLI prints it as one line."""


class UserError(Exception):
    """Bad input from the user: a wrong size, a missing file, an unknown layout, a mismatched LoRA."""


class WeightsError(UserError):
    """A checkpoint that cannot be loaded as asked: wrong layout, wrong family, missing or mis-shaped keys."""
