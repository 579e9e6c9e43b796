"""The warm HTTP server: app factory, routes, GPU worker, sessions service, error mapping."""
