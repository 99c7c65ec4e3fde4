"""The NATS JetStream adapter.
"""
