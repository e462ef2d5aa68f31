"""store_writer: consumes SEALED, writes envelopes to object storage, indexes them."""
