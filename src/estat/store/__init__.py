"""The event store: seed 004's tables on SQLAlchemy Core (SQLite by default,
PostgreSQL through psycopg 3), their Alembic migrations, and the operations
the pipeline's stages run on them (store events, enqueue and lease outbox
rows, write traces)."""
