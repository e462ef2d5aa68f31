"""encryptor: consumes INGEST, seals each instance in an A1 envelope, publishes to SEALED."""
