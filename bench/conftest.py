"""Benchmarks run on the real models; `make bench` installs them first."""
