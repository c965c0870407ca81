"""GPU state through checkpoints: the node inventory (NVML), decisions, cuda-checkpoint."""
