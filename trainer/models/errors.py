"""Errors raised by the model layer."""


class ModelError(ValueError):
    """A model file or folder cannot be read, recognised or converted.

    The message always names the file (when there is one) and the offending keys.
    """
