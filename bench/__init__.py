"""Benchmark, soak and overload scripts: they drive a real server and are not shipped."""
