"""The trio concurrency core: deliveries in, committed-then-acked batches out;
its metrics and its rate-limited event log.
"""
