// Runs fused_norm.cu on the CPU for the tests (no GPU here): each CUDA thread of a block is a
// std::thread, blocks run one after another (so `__shared__` can be a function-local static),
// __syncthreads is a block barrier and __shfl_down_sync goes through a per-warp buffer.
#pragma once
#include <barrier>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
#include <thread>
#include <vector>

#define FUSED_NORM_HOST_EMULATION 1
#define __global__
#define __device__
#define __forceinline__ inline
#define __restrict__ __restrict
#define __shared__ static

struct dim3 {
  unsigned x = 1, y = 1, z = 1;
};
struct alignas(16) uint4 {
  unsigned x, y, z, w;
};

namespace emu {
struct Block {
  std::unique_ptr<std::barrier<>> bar;
  std::vector<std::unique_ptr<std::barrier<>>> warp_bar;
  std::vector<float> shfl;  // [warps][32]
};
inline thread_local dim3 tidx, bidx, bdim, gdim;
inline thread_local Block* blk = nullptr;
}  // namespace emu

#define threadIdx emu::tidx
#define blockIdx emu::bidx
#define blockDim emu::bdim
#define gridDim emu::gdim

inline void __syncthreads() { emu::blk->bar->arrive_and_wait(); }

inline float __shfl_down_sync(unsigned, float v, int off) {
  const unsigned tid = threadIdx.y * blockDim.x + threadIdx.x, w = tid / 32, lane = tid % 32;
  float* buf = &emu::blk->shfl[w * 32];
  buf[lane] = v;
  emu::blk->warp_bar[w]->arrive_and_wait();
  const float r = lane + off < 32 ? buf[lane + off] : v;
  emu::blk->warp_bar[w]->arrive_and_wait();
  return r;
}

inline float __uint_as_float(unsigned u) { float f; std::memcpy(&f, &u, 4); return f; }
inline unsigned __float_as_uint(float f) { unsigned u; std::memcpy(&u, &f, 4); return u; }
inline float __int_as_float(int i) { float f; std::memcpy(&f, &i, 4); return f; }
inline float rsqrtf(float v) { return 1.0f / std::sqrt(v); }
inline unsigned min(unsigned a, unsigned b) { return a < b ? a : b; }

inline float half_to_float(unsigned short h) { _Float16 v; std::memcpy(&v, &h, 2); return (float)v; }
inline unsigned short float_to_half(float f) {
  _Float16 v = (_Float16)f;  // round to nearest even, like cvt.rn.f16.f32
  unsigned short h;
  std::memcpy(&h, &v, 2);
  return h;
}

namespace emu {
template <typename... A, std::size_t... I>
void call_impl(void (*f)(A...), void** a, std::index_sequence<I...>) {
  f(*reinterpret_cast<A*>(a[I])...);
}
template <typename... A>
void call(void (*f)(A...), void** a) {
  call_impl(f, a, std::index_sequence_for<A...>{});
}

// Launch `f` over the grid: one std::thread per CUDA thread of a block, reused for every
// block in turn (a barrier between blocks keeps the static "__shared__" memory private).
template <typename F>
void launch(F&& f, dim3 grid, dim3 block) {
  const unsigned n = block.x * block.y * block.z, warps = (n + 31) / 32;
  Block b;
  b.bar = std::make_unique<std::barrier<>>(n);
  for (unsigned w = 0; w < warps; ++w)
    b.warp_bar.push_back(std::make_unique<std::barrier<>>(w + 1 < warps ? 32 : n - 32 * w));
  b.shfl.assign(32 * warps, 0.0f);
  std::barrier<> between(n);
  std::vector<std::thread> threads;
  for (unsigned tz = 0; tz < block.z; ++tz)
    for (unsigned ty = 0; ty < block.y; ++ty)
      for (unsigned tx = 0; tx < block.x; ++tx)
        threads.emplace_back([&, tx, ty, tz] {
          tidx = {tx, ty, tz};
          bdim = block;
          gdim = grid;
          blk = &b;
          for (unsigned bz = 0; bz < grid.z; ++bz)
            for (unsigned by = 0; by < grid.y; ++by)
              for (unsigned bx = 0; bx < grid.x; ++bx) {
                bidx = {bx, by, bz};
                f();
                between.arrive_and_wait();
              }
        });
  for (auto& t : threads) t.join();
}
}  // namespace emu
