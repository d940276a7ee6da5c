"""GPU scoring: features and predictor for a batch whose logits are already on the device.

Never imported on a CPU-only path (the tests check it); needs hera_core._native_cuda, and cupy or
torch for device buffers.
"""
