"""MuseTalk warm server library: config, models, avatar prep, generation, sessions, HTTP server."""
