"""dicomflow: DICOM into client-side encrypted object storage over NATS JetStream."""
