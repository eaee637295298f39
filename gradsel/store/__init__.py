"""Floor 1: the store directory (manifest, shards and their markers, stage keys, locks, costs). Imports only `core`."""
