"""The embedded default: a local nats-server and every stage, run by `dicomflow up`."""
