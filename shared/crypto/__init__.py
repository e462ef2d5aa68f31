"""Keys and encryption: the A1 envelope, master keys, signatures, key and TLS files."""
