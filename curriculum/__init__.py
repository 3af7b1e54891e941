"""curriculum: progressive distillation of object detectors on Ray."""

__version__ = "0.1.0"
