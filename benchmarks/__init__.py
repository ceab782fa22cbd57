"""Benchmark harness: direct vs nginx vs haproxy vs the devstack router, same run, same host.

``python -m benchmarks.run`` drives wrk (HTTP/1.1) and h2load (gRPC over h2c) against each
candidate with interleaved repetitions and writes ``benchmarks/results/<date>.{json,md}``. Core 0
carries the load generator and the upstream nginx, core 1 the proxy under test alone. Nothing
here is imported by the router, the controller or the propagation SDK, and nothing here ever
listens beyond 127.0.0.1.
"""
