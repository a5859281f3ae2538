"""Benchmark harness of broker-bridge: ``python -m bench.run`` (``make bench``). See bench/README.md."""
