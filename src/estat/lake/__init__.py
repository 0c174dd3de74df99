"""The lake: object keys and the object-store sink (local directory or S3)."""
