"""scu_gateway: the DICOM sender (routing, forwarding, the enterprise side of the proxy).

Not built yet: it arrives with the issue "scu_gateway: routing, reliable forwarding and
the cross-zone DIMSE proxy". Nothing in dicomflow imports it or claims it works; the
``dicom.stored`` events it will consume are already published by the store writer.
"""
