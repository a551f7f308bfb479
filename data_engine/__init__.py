"""Datasets to identity-grouped WebDataset shards, and shards to training batches."""
