"""Teacher detectors: the zoo of detectors (teachers and students alike)."""
