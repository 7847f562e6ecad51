"""The HTTP front end: the FastAPI app, its routes, the ASGI guard and uvicorn's h11 patch."""
