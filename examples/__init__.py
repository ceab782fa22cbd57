"""The embedded demo stack: a route file and small services, run by ``devstack demo``."""
