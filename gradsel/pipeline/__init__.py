"""Floor 7: the recipes that run the stages in order: `score` (rollout then gradients), the Ray executor, and `rounds` (refresh)."""
