"""`sdrt serve`: the HTTP server (app.py) over the runtime, and its job queue (local.py, remote.py)."""
