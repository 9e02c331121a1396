// The CUDA epilogues (kernels and launchers in epilogue_kernels.cuh, written against the
// execution layer of exec.h, which maps to the CUDA built-ins here). The same header, compiled
// by the host compiler with the emulated execution layer, is what the CPU suite runs
// (host/emulated_kernels.cpp, tests/test_cuda_emulation.py).
#include "epilogue_kernels.cuh"
