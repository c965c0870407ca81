"""The checkpoint store: layout, manifest, atomic publish and claim, verification, retention."""
