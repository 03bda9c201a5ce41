"""The NVIDIA driver: its source tree, the build, the precompiled package, linking."""
