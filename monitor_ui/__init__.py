"""The monitor UI: a FastAPI app on its own port, reading the database the proxy writes."""
