"""The chat web page: `frontend/` (static files, no build step) and `backend/` (its routes)."""
