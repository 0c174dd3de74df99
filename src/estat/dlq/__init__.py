"""The local dead-letter queue: batches the lake would not take, kept on disk
until they can be uploaded under their original key."""
