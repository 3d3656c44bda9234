"""The errors a user can fix: a bad config, data set, model description or teacher/student pair.

Each message names the file, key or record at fault; the CLI prints them as one ``samkd: error: ...`` line and
exits with status 2 (:data:`USER_ERRORS`). They live here, in one module without dependencies, so that every
part of samkd can raise them without importing another part.
"""
from __future__ import annotations


class ConfigError(ValueError):
    """A config file or override is invalid; the message names the file and key."""


class DatasetError(ValueError):
    """Malformed, inconsistent or incomplete detection data; the message names the file, record and field, e.g.
    ``annotations/train.json: annotation id 17: category_id 99 is not in 'categories'``."""


class ModelConfigError(ValueError):
    """A detector cannot be built as configured (unknown arch/backbone, bad checkpoint, ...)."""


class DistillConfigError(ValueError):
    """Teacher and student cannot be distilled as configured."""


# Exit status 2 in the CLI: the config, the data or a named file is wrong (not the run).
USER_ERRORS = (ConfigError, DatasetError, ModelConfigError, DistillConfigError, FileNotFoundError)
