"""METHOD.md §4 metrics: their names (`names`, importable without torch), decoder geometry,
reconstruction over held-out tokens, CE splicing, and `evaluate` tying them together."""
