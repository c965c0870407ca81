"""containerd runtime shim with CRIU hot restart."""

__version__ = "0.1.0"
