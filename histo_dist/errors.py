"""The one exception type users see: an error they can fix, printed by the CLI without a traceback."""


class HistoDistError(Exception):
    """A problem with the user's input or environment (a file, key, value or setting), stated fully."""
