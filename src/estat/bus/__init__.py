"""The message bus between ingest and the event store: one seam (``Bus``,
``Consumer``), providers chosen by ``MQ_PROVIDER`` (in-process ``memory``,
``redis-stream``, ``nats``)."""
