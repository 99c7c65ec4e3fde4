"""The PostgreSQL adapter: schema migrations, the status writer and the
API's instance store.
"""
