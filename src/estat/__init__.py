"""estat: a self-hosted user-activity event collector."""

__version__ = "0.1.0"
