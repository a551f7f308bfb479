"""Loading shards: reader -> epoch plan -> checked bytes -> a decode backend -> batches."""
