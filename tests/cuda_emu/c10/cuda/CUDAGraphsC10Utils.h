// CPU stand-in for c10/cuda/CUDAGraphsC10Utils.h (tests/cuda_emu): no stream is
// ever being captured.
#pragma once

namespace c10::cuda {
enum class CaptureStatus { None = 0, Active = 1, Invalidated = 2 };
inline CaptureStatus currentStreamCaptureStatusMayInitCtx() { return CaptureStatus::None; }
}  // namespace c10::cuda
