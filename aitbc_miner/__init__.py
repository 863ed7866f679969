"""aitbc-miner: a hardened worker daemon for the AITBC compute network."""

__version__ = "0.1.0"
