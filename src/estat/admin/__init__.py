"""The admin and ops listener: its own port (``ADMIN_ADDR``), a standard
ASGI stack (FastAPI on uvicorn, in the server's event loop), scoped bearer
tokens, an audit row for every admin call."""
