"""Named search spaces for `curriculum tune` (loss weights, temperatures, decay schedules)."""
