"""Datasets to shards: adapters, the synthetic re-ID world, the shard writer and readers, samplers."""
