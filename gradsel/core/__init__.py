"""Floor 0, under every stage: errors, atomic file writes, the console, the declared choices and the Arrow schemas."""
