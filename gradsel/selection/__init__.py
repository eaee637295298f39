"""Floor 6, stage 3: the selection modes over the scored store, the targets and the FAISS index, and the output formats."""
