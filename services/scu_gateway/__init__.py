"""scu_gateway: routes stored instances to DICOM peers and delivers them with C-STORE."""
