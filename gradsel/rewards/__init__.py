"""Floor 3: the reward functions (one `Reward` record each in `registry.REGISTRY`) and what a judge paid (`payouts`)."""
