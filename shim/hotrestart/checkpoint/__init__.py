"""Hot restart: when to checkpoint, whether a checkpoint fits, and the engine that does both."""
