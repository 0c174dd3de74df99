"""The pipeline: event queue → batcher → upload queue → encoder → sink."""
