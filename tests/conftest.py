"""Test-wide settings: the test models are tiny, so one thread is fastest and stays fast when
another process (a benchmark) holds the other core."""

import torch

torch.set_num_threads(1)
