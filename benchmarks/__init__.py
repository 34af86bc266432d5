"""Benchmarks: models and data loaders for the AGD training program."""
