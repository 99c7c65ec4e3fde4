"""The API's handlers, one module per resource. Each class takes what its
handlers need and lists its routes in `routes`; app.py mounts them all."""
