"""The server on a Ray Serve cluster: one replica per GPU, every session pinned to the replica that owns it.

`routing` holds the policy (which session a request belongs to, which replica takes it) as plain
functions; `router` plugs it into Ray Serve's request-router hook; `deployment` builds the application
(a light gateway deployment that reads the session id, and the replica deployment that runs the same
FastAPI app as `server_fast.py`). Ray is imported only by the last two.
"""
