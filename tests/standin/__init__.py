"""A stand-in NVIDIA driver source tree for tests (see tree.py)."""
