"""Benchmarks (each against its baseline in the same run) and the prepared device check.

Run from the repository root as modules, e.g. ``python -m bench.heads --help``: the root is
then on the import path, so the scripts import the product and each other without path edits.
"""
