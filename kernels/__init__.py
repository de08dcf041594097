"""MSA ops: Triton kernels beside their plain-PyTorch references, behind one dispatcher.

Importable with only torch (and triton, when present): no hydra, gluonts or lightning here.
"""
from .dispatch import decode_attention, decode_select, get_backend, indexer_kl, select_blocks, set_backend, sparse_attention, triton_available
from .reference import (
    INT32_MAX,
    indexer_kl_reference,
    num_blocks,
    select_blocks_reference,
    sparse_attention_reference,
)
from .validation import KernelInputError
from .decode_reference import decode_attention_reference, decode_select_reference

__all__ = [
    "INT32_MAX", "KernelInputError", "decode_attention", "decode_attention_reference", "decode_select",
    "decode_select_reference", "get_backend", "indexer_kl", "indexer_kl_reference", "num_blocks",
    "select_blocks", "select_blocks_reference", "set_backend", "sparse_attention",
    "sparse_attention_reference", "triton_available",
]
