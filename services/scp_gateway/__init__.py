"""scp_gateway: the DICOM receiver. C-ECHO and C-STORE into the INGEST stream."""
