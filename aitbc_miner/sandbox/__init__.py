"""Per-job confinement: limits applied between fork and exec, cgroups, network gating."""
