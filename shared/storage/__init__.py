"""Object storage and the index: backends, object names, reading back, rotation."""
