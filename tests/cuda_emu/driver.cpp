// A fake `libcuda.so` for the emulated CUDA runs (see README.md here): the driver calls cudarc
// makes, on host memory, with kernels/kvsieve.cu compiled for the host through emu.h. A device
// pointer is a host pointer; every "asynchronous" call completes before it returns (one stream
// order, trivially kept). The device calls itself "kvsieve emulated CUDA device (host)", so
// every result produced here is labelled emulated.
//
// Built by scripts/cuda-emulated.sh with the kernel source: `kernels.inc` (generated from the
// source's `extern "C" __global__` lines) lists the kernels the launcher can run.
#include <ucontext.h>

#include <algorithm>
#include <mutex>
#include <cstdio>
#include <cstdlib>
#include <random>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

#include "emu.h"
#include KVS_EMU_KERNEL_SOURCE

#if defined(__SANITIZE_ADDRESS__)
#include <sanitizer/asan_interface.h>
#include <sanitizer/common_interface_defs.h>
#define KVS_EMU_ASAN 1
#endif

// Bounds of the __shared__ section (emu.h), defined by the linker.
extern "C" char __start_kvs_emu_shared[] __attribute__((weak));
extern "C" char __stop_kvs_emu_shared[] __attribute__((weak));

// ---------------------------------------------------------------------------------------------
// Fibers: one per thread of the running block.

namespace kvs_emu {

enum class Wait { None, Block, Warp, Done };

struct Fiber {
  ucontext_t ctx;
  kvs_emu_dim3 tid;
  Wait wait = Wait::None;
  int site = 0;                // the kernel source line of the barrier or shuffle it waits at
  uint64_t exchange = 0;       // this lane's value at a shuffle
};

Fiber* current = nullptr;
kvs_emu_dim3 block_idx, block_dim, grid_dim;

namespace {
constexpr size_t STACK = 256 * 1024;
constexpr size_t MAX_THREADS = 1024;
ucontext_t scheduler_ctx;
std::vector<Fiber> fibers;
std::vector<char> stacks;
std::string launch_error;  // first error of the running launch
void (*body)(void*) = nullptr;
void* body_arg = nullptr;
#ifdef KVS_EMU_ASAN
void* fake_stack = nullptr;           // the scheduler's, while a fiber runs
const void* main_bottom = nullptr;    // the scheduler's stack (the host thread's)
size_t main_size = 0;
#endif

void fail(const std::string& what) {
  if (launch_error.empty()) launch_error = what;
}

// Switch from the running fiber to the scheduler (the fiber stops at a barrier or at its end).
void to_scheduler() {
#ifdef KVS_EMU_ASAN
  void* save = nullptr;
  __sanitizer_start_switch_fiber(&save, main_bottom, main_size);
#endif
  swapcontext(&current->ctx, &scheduler_ctx);
#ifdef KVS_EMU_ASAN
  __sanitizer_finish_switch_fiber(save, &main_bottom, &main_size);
#endif
}

void fiber_main() {
#ifdef KVS_EMU_ASAN
  __sanitizer_finish_switch_fiber(nullptr, &main_bottom, &main_size);
#endif
  body(body_arg);
  current->wait = Wait::Done;
#ifdef KVS_EMU_ASAN
  __sanitizer_start_switch_fiber(nullptr, main_bottom, main_size);  // this fiber's stack is done
#endif
  swapcontext(&current->ctx, &scheduler_ctx);
}

void run(Fiber& f, size_t index) {
  current = &f;
  f.wait = Wait::None;
#ifdef KVS_EMU_ASAN
  __sanitizer_start_switch_fiber(&fake_stack, stacks.data() + index * STACK, STACK);
#else
  (void)index;
#endif
  swapcontext(&scheduler_ctx, &f.ctx);
#ifdef KVS_EMU_ASAN
  __sanitizer_finish_switch_fiber(fake_stack, nullptr, nullptr);
#endif
  current = nullptr;
}

enum class Order { Forward, Reverse, Shuffled };

Order order() {
  const char* o = getenv("KVSIEVE_EMU_ORDER");
  std::string s = o ? o : "forward";
  if (s == "reverse") return Order::Reverse;
  if (s == "shuffled") return Order::Shuffled;
  return Order::Forward;
}

std::vector<size_t> ordered(size_t n, Order o, std::mt19937& rng) {
  std::vector<size_t> idx(n);
  for (size_t i = 0; i < n; i++) idx[i] = i;
  if (o == Order::Reverse) std::reverse(idx.begin(), idx.end());
  if (o == Order::Shuffled) std::shuffle(idx.begin(), idx.end(), rng);
  return idx;
}

// One block: every thread to its end, switching at barriers. False on a barrier misuse.
bool run_block(unsigned threads, Order o, std::mt19937& rng) {
  if (__start_kvs_emu_shared != nullptr) {
    std::memset(__start_kvs_emu_shared, 0xff, (size_t)(__stop_kvs_emu_shared - __start_kvs_emu_shared));
  }
  fibers.assign(threads, Fiber{});
  // Allocated once: a resize would copy stacks an abandoned launch left poisoned (ASan).
  if (stacks.empty()) stacks.resize(MAX_THREADS * STACK);
  for (unsigned t = 0; t < threads; t++) {
    Fiber& f = fibers[t];
    f.tid = {t, 0, 0};
    getcontext(&f.ctx);
    f.ctx.uc_stack.ss_sp = stacks.data() + (size_t)t * STACK;
    f.ctx.uc_stack.ss_size = STACK;
    f.ctx.uc_link = nullptr;
    makecontext(&f.ctx, fiber_main, 0);
  }
  for (;;) {
    // Run every runnable fiber until it waits or ends.
    for (size_t i : ordered(threads, o, rng)) {
      if (fibers[i].wait == Wait::None) run(fibers[i], i);
      if (!launch_error.empty()) return false;
    }
    size_t done = 0, at_block = 0;
    for (auto& f : fibers) {
      done += f.wait == Wait::Done;
      at_block += f.wait == Wait::Block;
    }
    if (done == threads) return true;
    // Warps whose every lane is at the shuffle go on; a warp with some lanes elsewhere is an error.
    bool released = false;
    for (unsigned w = 0; w * 32 < threads; w++) {
      unsigned at_warp = 0;
      for (unsigned l = w * 32; l < std::min(threads, w * 32 + 32); l++) at_warp += fibers[l].wait == Wait::Warp;
      if (at_warp == 0) continue;
      if (at_warp != 32) {
        fail("a warp collective was reached by " + std::to_string(at_warp) + " of the 32 lanes of warp " +
             std::to_string(w) + " (the others ended or wait at __syncthreads)");
        return false;
      }
      for (unsigned l = w * 32 + 1; l < w * 32 + 32; l++) {
        if (fibers[l].site != fibers[w * 32].site) {
          fail("the lanes of warp " + std::to_string(w) + " wait at different shuffles (kernel source lines " + std::to_string(fibers[w * 32].site) + " and " + std::to_string(fibers[l].site) + ")");
          return false;
        }
      }
      for (unsigned l = w * 32; l < w * 32 + 32; l++) fibers[l].wait = Wait::None;
      released = true;
    }
    if (released) continue;
    if (at_block + done == threads && done > 0) {
      fail("__syncthreads was reached by " + std::to_string(at_block) + " of " + std::to_string(threads) +
           " threads; the others had returned");
      return false;
    }
    if (at_block == threads) {
      for (auto& f : fibers) {
        if (f.site != fibers[0].site) {
          fail("the block's threads wait at different __syncthreads (kernel source lines " + std::to_string(fibers[0].site) + " and " + std::to_string(f.site) + "; a divergent barrier)");
          return false;
        }
      }
      for (auto& f : fibers) f.wait = Wait::None;
      continue;
    }
    fail("the block's threads wait at different barriers");
    return false;
  }
}
}  // namespace

const kvs_emu_dim3& thread_idx() { return current->tid; }

void sync_block(int line) {
  current->site = line;
  current->wait = Wait::Block;
  to_scheduler();
}

uint64_t shfl_up(unsigned mask, uint64_t bits, unsigned delta, int line) {
  current->site = line;
  unsigned lane = current->tid.x & 31, warp = current->tid.x >> 5;
  if (mask != 0xffffffffu) fail("a shuffle mask other than the full warp (not emulated)");
  if ((warp + 1) * 32 > blockDim.x) fail("a full-mask shuffle in a warp with fewer than 32 threads");
  current->exchange = bits;
  current->wait = Wait::Warp;
  to_scheduler();  // every lane has written its value
  uint64_t got = lane >= delta ? fibers[warp * 32 + lane - delta].exchange : bits;
  current->wait = Wait::Warp;
  to_scheduler();  // every lane has read before any writes again
  return got;
}

// Run a whole grid; an empty string when it completed.
std::string launch(kvs_emu_dim3 grid, kvs_emu_dim3 block, void (*fn)(void*), void* arg) {
  launch_error.clear();
  if (block.y != 1 || block.z != 1) return "2-D and 3-D thread blocks are not emulated (kvsieve's are 1-D)";
  if (block.x == 0 || block.x > 1024 || grid.x == 0 || grid.y == 0 || grid.z == 0) return "an invalid launch shape";
  block_dim = block;
  grid_dim = grid;
  body = fn;
  body_arg = arg;
  Order o = order();
  std::mt19937 rng(0x6b7673u);
  size_t n = (size_t)grid.x * grid.y * grid.z;
  for (size_t b : ordered(n, o, rng)) {
    block_idx = {(unsigned)(b % grid.x), (unsigned)(b / grid.x % grid.y), (unsigned)(b / grid.x / grid.y)};
    if (!run_block(block.x, o, rng)) break;
  }
  return launch_error;
}

}  // namespace kvs_emu

// ---------------------------------------------------------------------------------------------
// Kernels by name: each takes its parameters from cuLaunchKernel's `kernelParams` array.

namespace {

template <class... A, size_t... I>
std::tuple<A...> unpack(void** params, std::index_sequence<I...>) {
  return std::tuple<A...>(*static_cast<A*>(params[I])...);
}

template <class... A>
struct Call {
  void (*fn)(A...);
  std::tuple<A...> args;
  static void run(void* self) {
    auto* c = static_cast<Call*>(self);
    std::apply(c->fn, c->args);
  }
};

template <class... A>
std::string launch_kernel(void (*fn)(A...), void** params, kvs_emu_dim3 grid, kvs_emu_dim3 block) {
  Call<A...> call{fn, unpack<A...>(params, std::index_sequence_for<A...>{})};
  return kvs_emu::launch(grid, block, &Call<A...>::run, &call);
}

struct Kernel {
  const char* name;
  std::string (*launch)(void**, kvs_emu_dim3, kvs_emu_dim3);
};

#define KVS_EMU_KERNEL(name) \
  {#name, [](void** p, kvs_emu_dim3 g, kvs_emu_dim3 b) { return launch_kernel(&name, p, g, b); }},
const Kernel KERNELS[] = {
#include "kernels.inc"
};

const Kernel* find_kernel(const char* name) {
  for (const Kernel& k : KERNELS)
    if (std::strcmp(k.name, name) == 0) return &k;
  return nullptr;
}

}  // namespace

// ---------------------------------------------------------------------------------------------
// The driver API, as much of it as cudarc and kvsieve call.

extern "C" {

typedef int CUresult;
typedef int CUdevice;
typedef unsigned long long CUdeviceptr;
typedef void* CUcontext;
typedef void* CUstream;
typedef void* CUevent;

enum {
  CUDA_SUCCESS = 0,
  CUDA_ERROR_INVALID_VALUE = 1,
  CUDA_ERROR_OUT_OF_MEMORY = 2,
  CUDA_ERROR_INVALID_DEVICE = 101,
  CUDA_ERROR_INVALID_IMAGE = 200,
  CUDA_ERROR_NOT_FOUND = 500,
  CUDA_ERROR_LAUNCH_FAILED = 719,
  CUDA_ERROR_NOT_SUPPORTED = 801,
};

#define API __attribute__((visibility("default")))

static char the_context = 0;   // one context: its address is the handle
static char the_stream = 0;

struct Module {
  std::vector<char> image;
};

API CUresult cuInit(unsigned) { return CUDA_SUCCESS; }
API CUresult cuDriverGetVersion(int* v) {
  *v = 12090;
  return CUDA_SUCCESS;
}
API CUresult cuDeviceGetCount(int* n) {
  *n = 1;
  return CUDA_SUCCESS;
}
API CUresult cuDeviceGet(CUdevice* d, int ordinal) {
  if (ordinal != 0) return CUDA_ERROR_INVALID_DEVICE;
  *d = 0;
  return CUDA_SUCCESS;
}
API CUresult cuDeviceGetName(char* name, int len, CUdevice) {
  std::snprintf(name, (size_t)len, "kvsieve emulated CUDA device (host)");
  return CUDA_SUCCESS;
}
API CUresult cuDeviceTotalMem_v2(size_t* bytes, CUdevice) {
  *bytes = (size_t)8 << 30;
  return CUDA_SUCCESS;
}
API CUresult cuDeviceGetAttribute(int* v, int attr, CUdevice) {
  switch (attr) {
    case 1: *v = 1024; break;            // MAX_THREADS_PER_BLOCK
    case 2: case 3: case 4: *v = 1024; break;  // MAX_BLOCK_DIM_X/Y/Z (z is 64 on real devices)
    case 5: *v = 2147483647; break;      // MAX_GRID_DIM_X
    case 6: case 7: *v = 65535; break;   // MAX_GRID_DIM_Y/Z
    case 8: *v = 49152; break;           // MAX_SHARED_MEMORY_PER_BLOCK
    case 10: *v = 32; break;             // WARP_SIZE
    case 16: *v = 132; break;            // MULTIPROCESSOR_COUNT
    case 41: *v = 1; break;              // UNIFIED_ADDRESSING
    case 75: *v = 9; break;              // COMPUTE_CAPABILITY_MAJOR
    case 76: *v = 0; break;              // COMPUTE_CAPABILITY_MINOR
    default: *v = 0;                     // memory pools, managed memory and the rest: absent
  }
  return CUDA_SUCCESS;
}
API CUresult cuDevicePrimaryCtxRetain(CUcontext* c, CUdevice) {
  *c = &the_context;
  return CUDA_SUCCESS;
}
API CUresult cuDevicePrimaryCtxRelease_v2(CUdevice) { return CUDA_SUCCESS; }
API CUresult cuCtxSetCurrent(CUcontext) { return CUDA_SUCCESS; }
API CUresult cuCtxGetCurrent(CUcontext* c) {
  *c = &the_context;
  return CUDA_SUCCESS;
}
API CUresult cuCtxGetDevice(CUdevice* d) {
  *d = 0;
  return CUDA_SUCCESS;
}
API CUresult cuCtxSynchronize() { return CUDA_SUCCESS; }
API CUresult cuCtxPushCurrent_v2(CUcontext) { return CUDA_SUCCESS; }
API CUresult cuCtxPopCurrent_v2(CUcontext* c) {
  if (c) *c = &the_context;
  return CUDA_SUCCESS;
}

API CUresult cuStreamCreate(CUstream* s, unsigned) {
  *s = &the_stream;
  return CUDA_SUCCESS;
}
API CUresult cuStreamCreateWithPriority(CUstream* s, unsigned, int) {
  *s = &the_stream;
  return CUDA_SUCCESS;
}
API CUresult cuStreamDestroy_v2(CUstream) { return CUDA_SUCCESS; }
API CUresult cuStreamSynchronize(CUstream) { return CUDA_SUCCESS; }
API CUresult cuStreamWaitEvent(CUstream, CUevent, unsigned) { return CUDA_SUCCESS; }
API CUresult cuStreamQuery(CUstream) { return CUDA_SUCCESS; }
API CUresult cuEventCreate(CUevent* e, unsigned) {
  *e = new char(0);
  return CUDA_SUCCESS;
}
API CUresult cuEventRecord(CUevent, CUstream) { return CUDA_SUCCESS; }
API CUresult cuEventSynchronize(CUevent) { return CUDA_SUCCESS; }
API CUresult cuEventQuery(CUevent) { return CUDA_SUCCESS; }
API CUresult cuEventDestroy_v2(CUevent e) {
  delete static_cast<char*>(e);
  return CUDA_SUCCESS;
}
API CUresult cuEventElapsedTime(float* ms, CUevent, CUevent) {
  *ms = 0.0f;
  return CUDA_SUCCESS;
}

// Exact-size host allocations, so AddressSanitizer sees a kernel that runs past a buffer.
API CUresult cuMemAlloc_v2(CUdeviceptr* p, size_t bytes) {
  void* m = std::malloc(bytes ? bytes : 1);
  if (!m) return CUDA_ERROR_OUT_OF_MEMORY;
  *p = (CUdeviceptr)m;
  return CUDA_SUCCESS;
}
API CUresult cuMemAllocAsync(CUdeviceptr* p, size_t bytes, CUstream) { return cuMemAlloc_v2(p, bytes); }
API CUresult cuMemFree_v2(CUdeviceptr p) {
  std::free((void*)p);
  return CUDA_SUCCESS;
}
API CUresult cuMemFreeAsync(CUdeviceptr p, CUstream) { return cuMemFree_v2(p); }
API CUresult cuMemGetInfo_v2(size_t* free_bytes, size_t* total) {
  *free_bytes = *total = (size_t)8 << 30;
  return CUDA_SUCCESS;
}
API CUresult cuMemcpyHtoD_v2(CUdeviceptr d, const void* h, size_t n) {
  std::memcpy((void*)d, h, n);
  return CUDA_SUCCESS;
}
API CUresult cuMemcpyHtoDAsync_v2(CUdeviceptr d, const void* h, size_t n, CUstream) { return cuMemcpyHtoD_v2(d, h, n); }
API CUresult cuMemcpyDtoH_v2(void* h, CUdeviceptr d, size_t n) {
  std::memcpy(h, (const void*)d, n);
  return CUDA_SUCCESS;
}
API CUresult cuMemcpyDtoHAsync_v2(void* h, CUdeviceptr d, size_t n, CUstream) { return cuMemcpyDtoH_v2(h, d, n); }
API CUresult cuMemcpyDtoD_v2(CUdeviceptr a, CUdeviceptr b, size_t n) {
  std::memmove((void*)a, (const void*)b, n);
  return CUDA_SUCCESS;
}
API CUresult cuMemcpyDtoDAsync_v2(CUdeviceptr a, CUdeviceptr b, size_t n, CUstream) { return cuMemcpyDtoD_v2(a, b, n); }
API CUresult cuMemsetD8_v2(CUdeviceptr d, unsigned char v, size_t n) {
  std::memset((void*)d, v, n);
  return CUDA_SUCCESS;
}
API CUresult cuMemsetD8Async(CUdeviceptr d, unsigned char v, size_t n, CUstream) { return cuMemsetD8_v2(d, v, n); }
API CUresult cuMemsetD32_v2(CUdeviceptr d, unsigned v, size_t n) {
  for (size_t i = 0; i < n; i++) ((unsigned*)d)[i] = v;
  return CUDA_SUCCESS;
}
API CUresult cuMemsetD32Async(CUdeviceptr d, unsigned v, size_t n, CUstream) { return cuMemsetD32_v2(d, v, n); }

// The image NVRTC compiled is kept: a function is found only if the real image has it.
API CUresult cuModuleLoadData(void** m, const void* image) {
  if (!image) return CUDA_ERROR_INVALID_VALUE;
  auto* mod = new Module;
  const char* p = static_cast<const char*>(image);
  size_t n;
  if (std::memcmp(p, "\x7f" "ELF", 4) == 0) {  // a cubin: its section headers end the file
    const auto* e = reinterpret_cast<const unsigned char*>(p);
    uint64_t shoff, shentsize, shnum;
    std::memcpy(&shoff, e + 0x28, 8);
    shentsize = (uint64_t)e[0x3a] | ((uint64_t)e[0x3b] << 8);
    shnum = (uint64_t)e[0x3c] | ((uint64_t)e[0x3d] << 8);
    n = (size_t)(shoff + shentsize * shnum);
  } else {  // PTX text
    n = std::strlen(p) + 1;
  }
  mod->image.assign(p, p + n);
  *m = mod;
  return CUDA_SUCCESS;
}
API CUresult cuModuleLoadDataEx(void** m, const void* image, unsigned, void*, void**) { return cuModuleLoadData(m, image); }
API CUresult cuModuleUnload(void* m) {
  delete static_cast<Module*>(m);
  return CUDA_SUCCESS;
}
API CUresult cuModuleGetFunction(void** f, void* m, const char* name) {
  auto* mod = static_cast<Module*>(m);
  std::string needle(name);
  bool in_image = std::search(mod->image.begin(), mod->image.end(), needle.begin(), needle.end()) != mod->image.end();
  const Kernel* k = find_kernel(name);
  if (!in_image || !k) return CUDA_ERROR_NOT_FOUND;
  *f = const_cast<Kernel*>(k);
  return CUDA_SUCCESS;
}
API CUresult cuFuncGetAttribute(int* v, int, void*) {
  *v = 0;
  return CUDA_SUCCESS;
}
API CUresult cuFuncSetAttribute(void*, int, int) { return CUDA_SUCCESS; }

static std::string last_launch_error;
static std::mutex launching;  // one grid at a time: the fibers and their scheduler are global

API CUresult cuLaunchKernel(void* f, unsigned gx, unsigned gy, unsigned gz, unsigned bx, unsigned by, unsigned bz,
                            unsigned shared, CUstream, void** params, void** extra) {
  if (!f || extra != nullptr || shared != 0) return CUDA_ERROR_INVALID_VALUE;  // no dynamic shared memory
  const Kernel* k = static_cast<const Kernel*>(f);
  // A deliberately broken kernel (tests/cuda_emulated.rs): its launches succeed and do nothing.
  const char* broken = getenv("KVSIEVE_EMU_BREAK");
  if (broken && std::strcmp(broken, k->name) == 0) return CUDA_SUCCESS;
  std::lock_guard<std::mutex> one(launching);
  std::string err = k->launch(params, {gx, gy, gz}, {bx, by, bz});
  if (!err.empty()) {
    last_launch_error = std::string(k->name) + ": " + err;
    std::fprintf(stderr, "kvsieve emulated CUDA: %s\n", last_launch_error.c_str());
    return CUDA_ERROR_LAUNCH_FAILED;
  }
  return CUDA_SUCCESS;
}

API CUresult cuGetErrorName(CUresult e, const char** s) {
  switch (e) {
    case CUDA_SUCCESS: *s = "CUDA_SUCCESS"; break;
    case CUDA_ERROR_LAUNCH_FAILED: *s = "CUDA_ERROR_LAUNCH_FAILED"; break;
    case CUDA_ERROR_NOT_FOUND: *s = "CUDA_ERROR_NOT_FOUND"; break;
    case CUDA_ERROR_INVALID_VALUE: *s = "CUDA_ERROR_INVALID_VALUE"; break;
    default: *s = "CUDA_ERROR (emulated)";
  }
  return CUDA_SUCCESS;
}
API CUresult cuGetErrorString(CUresult e, const char** s) {
  if (e == CUDA_ERROR_LAUNCH_FAILED && !last_launch_error.empty()) {
    *s = last_launch_error.c_str();
    return CUDA_SUCCESS;
  }
  return cuGetErrorName(e, s);
}

}  // extern "C"
