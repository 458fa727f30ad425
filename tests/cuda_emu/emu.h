// CUDA C on the host, for running kernels/kvsieve.cu without a GPU (emulated; see README.md
// here). Included before the kernel source (`-include emu.h`), compiled with a host C++ compiler
// into the fake driver (driver.cpp).
//
// The model it enforces is CUDA's, not a looser one:
// - A block's threads are fibers (ucontext) on one host thread, switched only at __syncthreads
//   and at warp collectives, run in the order the launch chooses (forward, reverse or shuffled,
//   `KVSIEVE_EMU_ORDER`); blocks run one after another in that order too. Code that relies on an
//   order CUDA does not promise gives different results between orders.
// - __syncthreads must be reached by every thread of the block (one that returned before a
//   barrier the others wait at is an error), all at the same call; __shfl_up_sync by every lane
//   of the warp (a full mask), all at the same call. Anything else stops the launch with an
//   error (CUDA leaves it undefined).
// - __shared__ variables are static storage in one section, poisoned (0xFF bytes: NaN floats,
//   huge integers) before every block, so a read before the block's own write shows.
// - Atomics need no locking: fibers never switch inside them.
#pragma once

#include <bit>
#include <cmath>
#include <cstdint>
#include <cstring>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
// One section for every __shared__ variable, so the launcher can poison them all per block.
#define __shared__ static __attribute__((section("kvs_emu_shared")))

struct kvs_emu_dim3 {
  unsigned x, y, z;
};

namespace kvs_emu {
struct Fiber;
extern Fiber* current;                   // the running thread of the block
extern kvs_emu_dim3 block_idx, block_dim, grid_dim;
const kvs_emu_dim3& thread_idx();        // of `current`
void sync_block(int line);               // __syncthreads at that source line
uint64_t shfl_up(unsigned mask, uint64_t bits, unsigned delta, int line);  // a warp's exchange
}  // namespace kvs_emu

#define threadIdx (kvs_emu::thread_idx())
#define blockIdx (kvs_emu::block_idx)
#define blockDim (kvs_emu::block_dim)
#define gridDim (kvs_emu::grid_dim)

// Macros, so each barrier and shuffle knows its line in the kernel source: kvs_emu checks that
// all threads wait at the same one (machine addresses would not do: the compiler may duplicate
// a barrier's code along different paths).
#define __syncthreads() kvs_emu::sync_block(__LINE__)
#define __shfl_up_sync(mask, v, delta) kvs_emu_shfl_up((mask), (v), (delta), __LINE__)

template <class T>
inline T kvs_emu_shfl_up(unsigned mask, T v, unsigned delta, int line) {
  static_assert(sizeof(T) <= 8, "a shuffle moves at most 64 bits");
  uint64_t bits = 0;
  std::memcpy(&bits, &v, sizeof(T));
  bits = kvs_emu::shfl_up(mask, bits, delta, line);
  T out;
  std::memcpy(&out, &bits, sizeof(T));
  return out;
}

inline float __int_as_float(int x) { return std::bit_cast<float>(x); }
inline float __uint_as_float(unsigned x) { return std::bit_cast<float>(x); }
inline unsigned __float_as_uint(float f) { return std::bit_cast<unsigned>(f); }
inline float rsqrtf(float x) { return 1.0f / std::sqrt(x); }
// Round-to-nearest, never fused: what the device intrinsics promise (the host build is ISO C++,
// which does not contract a * b + c).
inline float __fadd_rn(float a, float b) { return a + b; }
inline float __fsub_rn(float a, float b) { return a - b; }
inline float __fmul_rn(float a, float b) { return a * b; }

inline unsigned atomicCAS(unsigned* p, unsigned expected, unsigned desired) {
  unsigned old = *p;
  if (old == expected) *p = desired;
  return old;
}
inline unsigned atomicExch(unsigned* p, unsigned v) {
  unsigned old = *p;
  *p = v;
  return old;
}
// CUDA's overloads (unsigned, int, float, ...) in one.
template <class T>
inline T atomicAdd(T* p, T v) {
  T old = *p;
  *p = old + v;
  return old;
}

// IEEE half bits to float, exactly (what `cvt.f32.f16` does on the device).
inline float kvs_emu_half_bits_to_float(unsigned short h) {
  unsigned sign = (unsigned)(h >> 15) << 31, exp = (h >> 10) & 0x1f, man = h & 0x3ff, bits;
  if (exp == 0x1f) {
    bits = sign | 0x7f800000u | (man << 13);
  } else if (exp != 0) {
    bits = sign | ((exp + 112) << 23) | (man << 13);
  } else if (man == 0) {
    bits = sign;
  } else {  // subnormal half: normalise
    int e = -1;
    do {
      man <<= 1;
      e++;
    } while (!(man & 0x400));
    bits = sign | ((unsigned)(112 - e) << 23) | ((man & 0x3ff) << 13);
  }
  return __uint_as_float(bits);
}
