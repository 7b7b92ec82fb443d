"""The product dtype of fp32 weights by PyTorch's rules (margin_kernels.precision), decided outside the op."""
import pytest
import torch

from margin_kernels.precision import PRODUCTS, product_mode


@pytest.fixture
def restore_precision():
    saved = torch.get_float32_matmul_precision()
    yield
    torch.set_float32_matmul_precision(saved)


@pytest.mark.parametrize("mode, product", [("highest", "ieee"), ("high", "tf32"), ("medium", "bf16")])
def test_fp32_follows_matmul_precision(restore_precision, mode, product):
    torch.set_float32_matmul_precision(mode)
    assert product_mode(torch.float32, "cpu") == product and product in PRODUCTS


@pytest.mark.parametrize("dtype, product", [(torch.bfloat16, "bf16"), (torch.float16, "fp16")])
def test_autocast_decides_over_matmul_precision(restore_precision, dtype, product):
    torch.set_float32_matmul_precision("highest")
    with torch.autocast("cpu", dtype=dtype):
        assert product_mode(torch.float32, "cpu") == product
    assert product_mode(torch.float32, "cpu") == "ieee"
    # autocast on another device type does not change this device's products
    with torch.autocast("cpu", dtype=dtype):
        assert product_mode(torch.float32, "cuda") == "ieee"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64])
def test_other_storage_multiplies_in_its_own_dtype(restore_precision, dtype):
    torch.set_float32_matmul_precision("medium")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert product_mode(dtype, "cpu") == "storage"
