"""The family of expected user errors: the CLI prints any of them as one line and exits non-zero.

Anything that is not a `SplitclipError` is a bug and keeps its traceback. Each part defines its own
subclasses (BundleError, CodecError, PromptError, SettingsError, CheckpointError, ...) beside the
code that raises them; they also derive from ValueError, so callers that caught ValueError still do.
"""

from __future__ import annotations


class SplitclipError(Exception):
    """An error the user can fix (bad input, bad file, bad setting); its message says what and where."""


class UsageError(SplitclipError, ValueError):
    """A command-line argument or an input file that cannot be used."""
