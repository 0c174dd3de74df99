"""Alembic's environment: runs on the connection ``estat.store.db`` passes
(``config.attributes["connection"]``), or prints SQL (``estat migrate --sql``)."""

from __future__ import annotations

from alembic import context

from estat.store.schema import metadata

config = context.config

if context.is_offline_mode():
    context.configure(
        url=config.get_main_option("sqlalchemy.url"),
        target_metadata=metadata,
        literal_binds=True,
        render_as_batch=True,
    )
    with context.begin_transaction():
        context.run_migrations()
else:
    connection = config.attributes["connection"]
    context.configure(connection=connection, target_metadata=metadata, render_as_batch=True)
    with context.begin_transaction():
        context.run_migrations()
