"""The `dicomflow` command: one module per group of subcommands."""
