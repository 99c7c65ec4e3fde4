"""The HTTP API (Starlette on hypercorn).
"""
