"""Benchmarks behind `vla-stack bench ...`: each returns a JSON-able dict; the CLI prints the table."""
