"""Kafka -> micro-batches -> Prefect subflows -> rolling Parquet; offsets committed after files are durable."""
