"""Self-configuration as nnU-Net does it: fingerprint → plan → preprocess (and its inverse)."""
