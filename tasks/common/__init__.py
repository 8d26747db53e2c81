"""What the tasks share (backbones, dataset readers, image output); importable without Hydra or omegaconf."""
