"""Benchmarks run through `shardwright bench NAME [--quick] [--json]` (one module per NAME).

Each module defines `run(quick: bool) -> dict` returning {"results": [...], ...} where every
figure sits beside its baseline measured in the same run, and `COLUMNS` for the human table.
"""
