"""What a pod is an instance of: facts about the pod read from containerd, for hot restart."""
