"""Dataset error type.

Every :class:`DatasetError` message names the file at fault and, where it
applies, the record and field, e.g.::

    annotations/train.json: annotation id 17: category_id 99 is not in 'categories'
"""

from __future__ import annotations

__all__ = ["DatasetError"]


class DatasetError(ValueError):
    """Raised for malformed, inconsistent or incomplete detection datasets."""
