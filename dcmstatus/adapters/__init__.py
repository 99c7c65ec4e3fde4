"""Thin adapters between the engine and the outside: NATS JetStream,
PostgreSQL and HTTP.
"""
