"""The I/O-free core: the values that flow through dcmstatus, the error types,
the service-type catalog, the CloudEvents decoding and the batching decisions.
Nothing here does I/O, reads a clock or logs (a test enforces it).
"""
