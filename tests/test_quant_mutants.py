"""minipeft/core/nf4.py's corners that a mutation pass (tests/mutate.py) showed tests/test_quant.py leaves open,
checked against bitsandbytes' codes and quantization state (not its dequantize kernel, which differs
between CPUs)."""
import pytest
import torch

from minipeft.core import nf4 as quant

bnb = pytest.importorskip("bitsandbytes.functional")


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("largest", [1.5e-38, 5e-39, 1e-40])  # below fp32's smallest normal, 1.18e-38
def test_blocks_of_subnormal_values_quantize_as_bitsandbytes(largest, quant_type):
    """A block whose largest |w| is below 1e-38 is scaled by 1/1e-38 (bitsandbytes' clamp), one above it by
    1/absmax: the same codes and absmax either way."""
    w = torch.cat([torch.linspace(-1, 1, 64) * largest, torch.randn(64, generator=torch.Generator().manual_seed(0))])
    packed, state = quant.quantize_4bit(w, quant_type, 64, double_quant=False)
    ref_packed, ref_state = bnb.quantize_4bit(w, blocksize=64, quant_type=quant_type, compress_statistics=False)
    assert torch.equal(packed, ref_packed.view(-1))
    assert torch.equal(state.absmax, ref_state.absmax)
