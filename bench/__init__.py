"""Benchmarks: every scenario through the broker and, in the same run, against direct gRPC."""
