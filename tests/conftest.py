"""Suite-wide settings."""
import torch

# One intra-op thread: the probe, the pruner and Ray actors run side by side on small CI machines,
# and oversubscribed OpenMP threads spin instead of working (a 0.2 s test took 28 s with two).
torch.set_num_threads(1)
