"""Optional accelerator kernels (Triton). Each has a pure-PyTorch fallback in the method that uses it."""
