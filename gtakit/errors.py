"""User-facing errors: the CLI prints them as one line and exits non-zero, without a traceback."""


class GtakitError(ValueError):
    """Bad input or an unsupported request; the message says what to do."""
