"""NATS and JetStream: connections, users and certificates, topology, blob transport."""
