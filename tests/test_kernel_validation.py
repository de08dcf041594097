"""Model-build checks of the sizes the Triton kernels take (kernels/validation.py)."""
import pytest
import torch

from tsfm_msa.kernels.validation import (
    MAX_HEAD_DIM,
    MAX_TOP_K,
    KernelInputError,
    check_kernel_config,
    check_select_inputs,
)


@pytest.mark.parametrize("block_size", [1, 2, 4, 8, 16, 128, 1024])
def test_power_of_two_block_sizes_pass(block_size):
    check_kernel_config(block_size, 4, 64, 32)


@pytest.mark.parametrize("block_size,hint", [(12, "=8"), (24, "=16"), (0, "=16"), (-8, "=16"), (8.0, "=16"),
                                             (True, "=16")])
def test_bad_block_size_names_the_key(block_size, hint):
    with pytest.raises(KernelInputError, match=rf"^model\.block_size={block_size!r}: .*power of two.*block_size{hint}"):
        check_kernel_config(block_size, 4, 64, 32)


@pytest.mark.parametrize("top_k", [0, -1, 2.0, "abc", True])
def test_top_k_of_the_wrong_type_or_sign_says_positive_integer(top_k):
    with pytest.raises(KernelInputError) as err:
        check_kernel_config(8, top_k, 64, 32)
    assert str(err.value) == f"model.top_k must be a positive integer, got {top_k!r}"  # no kernel-limit advice


def test_top_k_above_the_kernel_limit_keeps_the_advice():
    with pytest.raises(KernelInputError, match=rf"^model\.top_k={MAX_TOP_K + 1}: .*raise model\.block_size"):
        check_kernel_config(8, MAX_TOP_K + 1, 64, 32)


@pytest.mark.parametrize("name,args", [("head_dim", (8, 4, MAX_HEAD_DIM + 1, 32)), ("index_dim", (8, 4, 64, 0))])
def test_bad_dims_name_the_key(name, args):
    with pytest.raises(KernelInputError, match=rf"^probe\.{name}="):
        check_kernel_config(*args, prefix="probe.")


def test_token_count_past_int32_is_rejected_before_any_kernel():
    # B * L = 2^31 tokens as expanded views of one token (no memory behind them).
    batch, seq_len = 2, 2**30
    qi = torch.randn(1, 1, 1, 4).expand(batch, 1, seq_len, 4)
    ki = torch.randn(1, 1, 4).expand(batch, seq_len, 4)
    t = torch.zeros(1, 1, dtype=torch.int32).expand(batch, seq_len)
    with pytest.raises(KernelInputError, match="2\\^31"):
        check_select_inputs(qi, ki, t, t, 2**20, 4, None, None)
