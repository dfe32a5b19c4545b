"""The training data as the engine reads it: packed samples from the manifest's shards, per data-parallel rank."""
