"""Implementations of CLI subcommands that do more than print the registry."""
