"""Benchmarks that print measured tables (never asserted): routing quality, overhead, speedup.

Every server here is teamorch's Ollama-API simulator (`teamorch.sim`), not a real
Ollama: service times are known, so the best possible makespan is computable and
each ratio is against a bound or a baseline measured in the same run.
"""
