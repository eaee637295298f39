"""Floor 8: reading a finished store back: `info` (summary), the HTML report, and the key audit."""
