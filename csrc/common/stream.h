// fb::Stream: the stream a launch is queued on, one type for the bindings, the op entry points and
// fb::launch (plain C++, both builds). Device build: cudaStream_t (torch's current stream, passed
// from Python as an int); host build: unused, launches run synchronously on the CPU.
#pragma once

#ifndef FASTBERT_HOST
#include <cuda_runtime_api.h>
#endif

namespace fb {

#ifdef FASTBERT_HOST
using Stream = void*;
#else
using Stream = cudaStream_t;
#endif

}  // namespace fb
