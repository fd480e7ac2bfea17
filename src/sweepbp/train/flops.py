"""Model FLOPs per token and peak dense FLOP/s per GPU, for model FLOPs utilisation (MFU).

Convention (documented in docs/metrics.md):
- A matmul with a weight of N parameters costs 2N FLOPs per token in the forward.
- Frozen base weights: forward 2N + input-gradient 2N = 4N per token (no weight gradient).
- Trained weights (an adapter's, or every weight under method=full): 6N per token (forward, input
  gradient, weight gradient).
- Attention scores and values (no weights): 4 * layers * seq_len * hidden per token in the forward,
  twice that in the backward: 12 * layers * seq_len * hidden in total (not halved for the causal mask).
- The embedding lookup is not a matmul and counts nothing. Recomputation under checkpointing is not
  useful work and is not counted: MFU is model FLOPs, not hardware FLOPs.
"""

from __future__ import annotations

# Peak dense (no sparsity) tensor-core FLOP/s for 16-bit inputs, from the vendors' data sheets.
PEAK_BF16_FLOPS = {
    "H200": 989.4e12,  # H200 SXM
    "H100 SXM": 989.4e12,
    "H100 NVL": 835.5e12,
    "H100 PCIe": 756.5e12,
    "H100": 989.4e12,  # an "H100" name without form factor: SXM
    "A100": 312e12,
    "L40S": 362.05e12,
    "L4": 121e12,
    "RTX 4090": 165.2e12,  # with FP32 accumulate
    "A10G": 70e12,
}


def peak_flops(device_name: str) -> float | None:
    """Peak dense bf16 FLOP/s of a GPU from its CUDA device name, or None if not in the table."""
    for key in sorted(PEAK_BF16_FLOPS, key=len, reverse=True):
        if key.lower() in device_name.lower():
            return PEAK_BF16_FLOPS[key]
    return None


def training_flops_per_token(frozen_matmul_params: int, trainable_params: int, layers: int, seq_len: int,
                             hidden: int) -> float:
    """Useful training FLOPs per token (the convention above): LoRA's frozen base 4N, trained weights 6N."""
    return 4.0 * frozen_matmul_params + 6.0 * trainable_params + 12.0 * layers * seq_len * hidden
