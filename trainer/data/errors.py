"""The one exception type of the data layer."""

from __future__ import annotations


class DataError(ValueError):
    """A dataset file or dataset setting is unusable.

    The message always names the file, folder or setting and the offending value,
    so it can be shown to the user as-is (no traceback needed).
    """
