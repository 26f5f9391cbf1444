"""The one Kafka module, shared by the producers and the consumer (the core, `pipeline/`, knows
nothing of Kafka and never imports it).

    clients.py      aiokafka clients built from the settings (security included), and the one
                    wait for a broker that is not up yet (METAVOICE_KAFKA_CONNECT_TIMEOUT_S)
    topics.py       the events topic and its dead-letter topic: created when missing, retention checked
    dead_letter.py  the dead-letter record: one bounded JSON format, one timestamp format
    errors.py       what the broker side can fail with, grafted onto `pipeline.errors`

Named `broker`, not `kafka`: a top-level `kafka` would shadow kafka-python.
"""
