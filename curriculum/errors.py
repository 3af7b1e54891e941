"""Errors a user can act on. Each names the file, the entry and what to do."""


class CurriculumError(Exception):
    """Base class: caught by the CLI and printed without a traceback."""


class DataError(CurriculumError, ValueError):
    """Bad data-set input: annotation file, image, box, category."""


class ConfigError(CurriculumError, ValueError):
    """Bad configuration: unknown key, wrong type, value out of range."""


class ModelError(CurriculumError, ValueError):
    """Unknown model name, incompatible checkpoint, weights that cannot be loaded."""


class CacheError(CurriculumError):
    """A cache cannot be used as asked (missing, incomplete, wrong view)."""


class StaleCacheError(CacheError):
    """The cache was written for another teacher checkpoint, data set or view config."""


class CorruptShardError(CacheError):
    """A shard file is missing, truncated or differs from its manifest entry."""

    def __init__(self, message: str, shard: int | None = None, path: str | None = None) -> None:
        super().__init__(message)
        self.shard = shard
        self.path = path


class CacheLockedError(CacheError):
    """Another writer (precompute or rebuild) holds the cache folder."""
