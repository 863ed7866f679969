"""Trusted Python tasks shipped with the miner (installed under runners.python.task_paths)."""
