"""Delivery of stored events to destinations (seed 004's dispatch stage)."""
