"""Test support: DICOM file makers, server fixtures, pipeline runner."""
