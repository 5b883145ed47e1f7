// CPU stand-in for <cuda_fp16.h>, for the CUDA emulation build of the tests
// (tests/cuda_emu/README.md): __half is c10::Half (round to nearest even, as
// __float2half).
#pragma once

#include <c10/util/Half.h>

using __half = c10::Half;

inline __half __float2half(float x) { return c10::Half(x); }
inline float __half2float(__half x) { return static_cast<float>(x); }
