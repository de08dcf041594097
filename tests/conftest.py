import os
import sys

# Triton kernels run on the CPU through the interpreter in the test suite.
os.environ.setdefault("TRITON_INTERPRET", "1")
sys.path.insert(0, os.path.dirname(__file__))
