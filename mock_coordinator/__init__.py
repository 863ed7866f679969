"""A mock AITBC coordinator implementing PROTOCOL.md, for tests and the demo."""
