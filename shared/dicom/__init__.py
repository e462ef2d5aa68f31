"""DICOM network pieces used by both gateways."""
