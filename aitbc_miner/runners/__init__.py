"""Job runners: the CLI runner (allowlisted programs) and the Python task runner."""
