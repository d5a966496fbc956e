"""Load tests and benchmarks (run from the repository root: `python -m loadtests.<module>`)."""
