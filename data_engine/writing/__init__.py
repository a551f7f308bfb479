"""Writing shards: sources -> plan -> tar writer -> manifest and index (the shard CLI)."""
