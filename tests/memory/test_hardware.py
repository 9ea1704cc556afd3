import pytest
import torch

from featherflux.memory.hardware import KNOWN_GPUS, REACHED_FRACTION, GiB, gpu_hardware, known_gpu, measure


@pytest.mark.parametrize(
    ("name", "key"),
    [
        ("NVIDIA H200", "H200"),
        ("NVIDIA H100 80GB HBM3", "H100"),
        ("NVIDIA H100 PCIe", "H100 PCIe"),  # the longer name wins over "H100"
        ("NVIDIA GeForce RTX 4090", "RTX 4090"),
        ("NVIDIA L40S", "L40S"),
        ("NVIDIA L4", "L4"),
        ("NVIDIA A100-SXM4-80GB", "A100"),
    ],
)
def test_cards_are_found_by_torchs_device_name(name, key):
    assert known_gpu(name) is KNOWN_GPUS[key]


def test_an_unknown_card_is_not_guessed():
    assert known_gpu("Some Future Accelerator") is None


def test_an_h200_is_planned_as_an_h200_not_as_a_4090():
    h200 = gpu_hardware("NVIDIA H200", (9, 0), 139 * GiB, 256 * GiB)
    rtx = gpu_hardware("NVIDIA GeForce RTX 4090", (8, 9), 24 * GiB, 64 * GiB)
    assert h200.source == rtx.source == "datasheet"
    assert h200.tflops == pytest.approx(989 * REACHED_FRACTION)
    assert h200.fp8_matmul and h200.fp8_tflops == pytest.approx(2 * h200.tflops, rel=0.01)
    assert h200.tflops > 5 * rtx.tflops and h200.h2d_gbps > rtx.h2d_gbps
    assert "H200" in h200.describe() and "fp8" in h200.describe()


def test_fp8_speed_needs_fp8_tensor_cores():
    assert not gpu_hardware("NVIDIA A100-SXM4-80GB", (8, 0), 80 * GiB, 256 * GiB).fp8_matmul


def test_measuring_gives_positive_rates_and_is_done_once_per_device():
    first = measure("cpu", size=256, repeats=2)
    assert all(rate > 0 for rate in first)
    assert measure(torch.device("cpu"), size=256, repeats=2) is first
