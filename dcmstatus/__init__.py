"""dcmstatus: keeps DCM service-type instance statuses in PostgreSQL current
from provider CloudEvents on NATS JetStream."""

__version__ = "0.1.0"
