"""Procedural faces with known identities and known defects, for demos, tests and benchmarks.

Depends on no other package of the project except ``common``; sharding, the synthetic IJB
sets and the benchmarks render from here.
"""
