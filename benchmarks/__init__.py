"""Benchmarks (not tests): each prints a table and writes JSON + markdown under benchmarks/results/."""
