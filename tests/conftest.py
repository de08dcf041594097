import os
import sys

import torch

# Without a GPU the Triton kernels run on the CPU through the interpreter; with one they compile
# for real (set TRITON_INTERPRET yourself to override). Must happen before triton is imported.
if "TRITON_INTERPRET" not in os.environ and not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"
sys.path.insert(0, os.path.dirname(__file__))


import random
import zlib

import numpy as np
import pytest
import torch


@pytest.fixture(autouse=True)
def _seed_every_test(request):
    """Every test draws reproducible random inputs: torch, numpy and random are seeded from the
    test's id (different tests get different, fresh inputs; a failure replays exactly)."""
    seed = zlib.crc32(request.node.nodeid.encode())
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    yield


@pytest.fixture(scope="module")
def one_torch_thread():
    """One intra-op thread for a module's tests: on shared CPUs, OpenMP threads spinning against
    other jobs make tiny models ~10x slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
