"""Logs, metrics, traces and health: what every service reports about itself."""
