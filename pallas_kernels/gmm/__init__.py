"""Grouped matmuls: Mosaic TPU (tpu.py) and Triton GPU (gpu.py) kernels, their visit plan and tiling."""
