"""Seed 004's user-activity pipeline, as stages: the publisher (accepted
client events → bus, falling back to the source outbox), the relay (source
outbox → bus), the store consumer (bus → ``user_activity_event`` and the
dispatch outbox) and the housekeeper (trace log, backlog gauges)."""
