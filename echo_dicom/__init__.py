"""echo_dicom: a DICOM node on the torch-free runtime (C-STORE SCP or DICOMweb in, SR out).

Imports `runtime` only (tests/test_layer_rule.py): an edge box installs the base package plus
the [dicom-node] extra, no PyTorch. See docs/pacs.md.
"""
