"""The engine: request lifecycle, step loop, detokenization and token-probability records."""
