"""keyrotor's domain: no mitmproxy, no SQL, no FastAPI. Addons, storage, the UI and the CLI build on it."""
