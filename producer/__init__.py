"""Event sources -> Kafka: bucket notifications and backfills become object-created events."""
