"""The HTTP API: FastAPI app factory (`api.main:create_app`), routes, request/response schemas, auth."""
