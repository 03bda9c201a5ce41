"""nvidia-driver: NVIDIA kernel modules for Flatcar Container Linux."""

__version__ = "0.1.0"
