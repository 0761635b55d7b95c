"""One exception type for every user-facing failure, so the CLI can print one line and exit 2."""


class PromptKDError(Exception):
    """A problem with the user's input, files or configuration (not a bug in promptkd)."""
