"""Floor 2: what a run reads: the problem pool, the checkpoint snapshot, and the model and tokenizer loaders."""
