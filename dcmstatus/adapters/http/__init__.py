"""The HTTP API: a Starlette application served by hypercorn (trio worker).

app.py assembles it (routes, middleware, exception handlers); routing.py,
auth.py and problems.py are the edge every request passes through;
inputs.py and page_tokens.py check what a request brings; routes/ holds the
handlers, one module per resource. See docs/http-api.md.
"""
