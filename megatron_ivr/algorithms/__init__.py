"""The algorithms of both papers, independent of trainer and rollout engine (spec sections 2-4)."""
