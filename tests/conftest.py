"""Test-wide settings: the test models are tiny, so one thread is fastest and stays fast when
another process (a benchmark) holds the other core; every pass checks its contract
(:mod:`passes.contracts`), the exactness table included, and so do the command-line runs the
tests start in processes of their own."""

import os

import torch

torch.set_num_threads(1)
os.environ["GRAINFX_CHECKED"] = "1"
