"""Teacher pseudo-labels: the review project on disk, generation, editing (split/merge)."""
