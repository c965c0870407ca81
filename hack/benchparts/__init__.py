"""The parts of `make bench` (hack/bench.py): one module per measurement, and their shared workload."""
