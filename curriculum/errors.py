"""Errors a user can act on. Each names the file, the entry and what to do."""


class CurriculumError(Exception):
    """Base class: caught by the CLI and printed without a traceback."""


class DataError(CurriculumError, ValueError):
    """Bad data-set input: annotation file, image, box, category."""


class ConfigError(CurriculumError, ValueError):
    """Bad configuration: unknown key, wrong type, value out of range."""


class ModelError(CurriculumError, ValueError):
    """Unknown model name, incompatible checkpoint, weights that cannot be loaded."""
