"""The GPU smoke suite: the CUDA path as users run it (bf16, grouped GEMM, flex attention, Triton, compile, EP).

Every test here is marked `gpu` and skips without CUDA; see docs/testing.md."""
