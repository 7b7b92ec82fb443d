"""The cuda backend's choice between the epilogue-fused CUTLASS GEMMs and cuBLAS (backends/cuda_variant.py), by
arch, dtype and options, without a GPU; and that ``backend="auto"`` never names the fused path."""
import pytest
import torch

from margin_kernels.backends import cuda_variant
from margin_kernels.backends.cuda_variant import CUBLAS, CUTLASS, select

H100, A100, B200 = (9, 0), (8, 0), (10, 0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_hopper_with_16_bit_operands_takes_the_fused_path(dtype):
    assert select(H100, dtype, 512, has_fused=True)[0] == CUTLASS


@pytest.mark.parametrize("capability", [A100, (8, 6), (8, 9), B200, None])
def test_other_archs_take_cublas(capability):
    chosen, why = select(capability, torch.bfloat16, 512, has_fused=True)
    assert chosen == CUBLAS and "sm_90a" in why


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, None])
def test_fp32_ieee_and_fp64_take_cublas(dtype):
    # None: fp32 storage multiplied in fp32 (product "ieee"/"tf32": no cast operand dtype)
    assert select(H100, dtype, 512, has_fused=True)[0] == CUBLAS


def test_an_extension_without_the_kernels_takes_cublas():
    chosen, why = select(H100, torch.bfloat16, 512, has_fused=False)
    assert chosen == CUBLAS and "without the CUTLASS kernels" in why


@pytest.mark.parametrize("options", [dict(sub_centers=3), dict(grad_filter=1e-3), dict(keep_cols=8192)])
def test_options_outside_the_fused_epilogue_take_cublas(options):
    assert select(H100, torch.bfloat16, 512, has_fused=True, **options)[0] == CUBLAS


def test_fp64_accumulation_or_a_torch_without_mixed_mm_takes_cublas():
    assert select(H100, torch.bfloat16, 512, has_fused=True, acc_dtype=torch.float64)[0] == CUBLAS
    chosen, why = select(H100, torch.bfloat16, 512, has_fused=True, mixed_mm=False)
    assert chosen == CUBLAS and "out_dtype" in why


def test_unaligned_feature_dim_takes_cublas():
    assert select(H100, torch.bfloat16, 500, has_fused=True)[0] == CUBLAS
    assert select(H100, torch.bfloat16, 504, has_fused=True)[0] == CUTLASS


def test_operand_dtype_follows_storage_and_product():
    x16 = torch.zeros(2, 8, dtype=torch.bfloat16)
    assert cuda_variant.operand_dtype(x16, x16, "storage") == torch.bfloat16
    x32 = torch.zeros(2, 8)
    # on CPU tensors no cast product applies (chunk_loop.product_operand_dtype: CUDA only)
    assert cuda_variant.operand_dtype(x32, x32, "bf16") is None


def test_an_extension_says_whether_it_holds_the_kernels():
    class Without:
        pass

    class With:
        @staticmethod
        def has_cutlass_sm90():
            return True

    assert not cuda_variant.has_fused_kernels(Without()) and cuda_variant.has_fused_kernels(With())


def test_auto_never_names_the_fused_path():
    from margin_kernels import backends
    assert CUTLASS not in backends.BACKEND_NAMES and "cutlass" not in " ".join(backends.BACKEND_NAMES)


def test_variant_of_a_call_without_an_sm90_device_is_cublas():
    from margin_kernels.backends import cuda_backend
    from margin_kernels.backends.contract import OpConfig
    x = torch.zeros(4, 16, dtype=torch.bfloat16)
    assert cuda_backend.variant(x, torch.zeros(10, 16, dtype=torch.bfloat16), OpConfig()) == CUBLAS
    chosen, why = cuda_backend.choose(x, torch.zeros(10, 16, dtype=torch.bfloat16), OpConfig())
    assert chosen == CUBLAS and why
