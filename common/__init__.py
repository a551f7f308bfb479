"""Helpers every command-line entry point shares: errors, progress, device choice."""
