"""The package's error types, in one module that imports nothing of ours, so
every layer (models, distribution, training, search, cli) can raise and catch
them without importing upward.

All are `ValueError`s: bad input named by field and value. The command line
prints them as one `error:` line (exit 2; exit 3 for a non-finite loss).
"""


class TrainingError(ValueError):
    """Bad input to a training run, a plan, a comparison or a search
    (reported with exit code 2 by the CLI)."""


class NonFiniteLossError(TrainingError):
    """The training loss became NaN or infinite (the message names the step)."""


class PresetError(ValueError):
    """A preset folder is incomplete or corrupted, or missing from this
    installation (the message names the file or folder)."""


class PresetWarning(UserWarning):
    """A preset folder is loaded without the means to check it: it records
    no checksums, so a corrupted or swapped file cannot be detected before
    loading (the command line prints it as one `warning:` line)."""


class TrainingInterrupted(Exception):
    """Training stopped at the user's request (Ctrl-C) after writing a
    checkpoint of exactly the steps done (the CLI exits with code 130).
    Not a `ValueError`: nothing was wrong with the input."""
