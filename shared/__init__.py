"""Code used by more than one dicomflow service. Never imports a service."""
