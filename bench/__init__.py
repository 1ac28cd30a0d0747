"""Benchmarks of the relay (run them as scripts: ``python bench/ingress.py``)."""
