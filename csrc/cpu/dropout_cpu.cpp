// pybind11 module `fastbert._C_cpu`: the shared dropout keep masks (scheme v2, specified in
// fastbert/backends/_philox.py) generated on the CPU, bit-identical to the spec's torch-op
// generator. The torch backend's mask generation, compiled: a BERT-base training step draws ~30 MB
// of keep decisions, which the torch-op generator spends ~100 int64 ops per 8 columns on.
//
// A module of its own, not a part of fastbert._C_host: that one is the test-only emulation of the
// CUDA kernels (fibers, the planted-fault harness, minutes to compile); this one is what the
// default CPU backend runs, a few hundred lines that compile in seconds. Like the other modules it
// takes raw pointers and plain integers (no torch C++ ABI). It runs on `threads` threads (the
// caller passes torch.get_num_threads()) with the GIL released.
//
// Philox4x32-10 (Salmon et al., SC 2011) is written out here over a lane array rather than taken
// from csrc/common/philox.cuh: that header is the per-thread scalar form for the kernels and pulls
// in the CUDA / host-emulation platform; here LANES consecutive groups run side by side so the
// compiler vectorises the 32x32->64-bit products (pmuludq / vpmuludq).
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

#ifndef FASTBERT_VERSION
#error "FASTBERT_VERSION is set by CMakeLists.txt from fastbert/__init__.py"
#endif

namespace py = pybind11;

namespace {

constexpr uint32_t kM0 = 0xD2511F53u, kM1 = 0xCD9E8D57u, kW0 = 0x9E3779B9u, kW1 = 0xBB67AE85u;
constexpr int kColumnsPerCall = 8;  // 4 words x 2 halves of 16 bits
constexpr int kLanes = 16;          // groups drawn side by side

// AVX2 doubles the multiply lanes where the CPU has it; one binary serves every x86-64 CPU.
#if defined(__x86_64__) && defined(__GNUC__) && defined(__linux__)
#define FB_CPU_CLONES __attribute__((target_clones("avx2", "default")))
#else
#define FB_CPU_CLONES
#endif

// Keep decisions of the groups g0 .. g0 + count - 1 (count <= kLanes) of one line with counter
// (g, c1, c2, c3) into keep[8 * (g - g0) + j]: column j of a group reads the 16-bit half j % 2 of
// word j / 2, i.e. the little-endian uint16 view of the words (w0, w1, w2, w3).
FB_CPU_CLONES void keep_lanes(uint8_t* keep, uint32_t g0, int count, uint32_t c1_, uint32_t c2_, uint32_t c3_,
                              uint32_t k0_, uint32_t k1_, uint32_t threshold) {
  uint32_t c0[kLanes], c1[kLanes], c2[kLanes], c3[kLanes];
  for (int l = 0; l < kLanes; ++l) {
    c0[l] = g0 + static_cast<uint32_t>(l);
    c1[l] = c1_;
    c2[l] = c2_;
    c3[l] = c3_;
  }
  uint32_t k0 = k0_, k1 = k1_;
  for (int round = 0; round < 10; ++round) {
    for (int l = 0; l < kLanes; ++l) {
      const uint64_t p0 = static_cast<uint64_t>(c0[l]) * kM0;
      const uint64_t p1 = static_cast<uint64_t>(c2[l]) * kM1;
      const uint32_t n0 = static_cast<uint32_t>(p1 >> 32) ^ c1[l] ^ k0;
      const uint32_t n2 = static_cast<uint32_t>(p0 >> 32) ^ c3[l] ^ k1;
      c0[l] = n0;
      c1[l] = static_cast<uint32_t>(p1);
      c2[l] = n2;
      c3[l] = static_cast<uint32_t>(p0);
    }
    k0 += kW0;
    k1 += kW1;
  }
  uint16_t halves[kLanes * kColumnsPerCall];
  for (int l = 0; l < kLanes; ++l) {
    const uint32_t w[4] = {c0[l], c1[l], c2[l], c3[l]};
    for (int q = 0; q < 4; ++q) {
      halves[8 * l + 2 * q] = static_cast<uint16_t>(w[q] & 0xFFFFu);
      halves[8 * l + 2 * q + 1] = static_cast<uint16_t>(w[q] >> 16);
    }
  }
  uint8_t out[kLanes * kColumnsPerCall];
  for (int x = 0; x < kLanes * kColumnsPerCall; ++x) out[x] = halves[x] >= threshold ? 1 : 0;
  std::memcpy(keep, out, static_cast<size_t>(count) * kColumnsPerCall);
}

// One line: groups g0 .. g0 + groups - 1 with counter (g, c1, c2, c3) into keep[0 .. 8 * groups);
// the groups from the `valid`-th on are zeros (varlen: keys at or past the sequence's length).
void keep_line(uint8_t* keep, int64_t g0, int64_t groups, int64_t valid, uint32_t c1, uint32_t c2, uint32_t c3,
               uint32_t k0, uint32_t k1, uint32_t threshold) {
  for (int64_t g = 0; g < valid; g += kLanes) {
    const int count = static_cast<int>(std::min<int64_t>(kLanes, valid - g));
    keep_lanes(keep + kColumnsPerCall * g, static_cast<uint32_t>(g0 + g), count, c1, c2, c3, k0, k1, threshold);
  }
  if (valid < groups) {
    std::memset(keep + kColumnsPerCall * valid, 0, static_cast<size_t>(kColumnsPerCall * (groups - valid)));
  }
}

// Lines [0, lines) split into `threads` contiguous ranges, the first on the calling thread.
template <class F>
void parallel_lines(int64_t lines, int threads, const F& body) {
  // At least ~64 lines (~64 x 16 groups of work) per thread: below that a thread costs more than it saves.
  const int64_t n = std::max<int64_t>(1, std::min<int64_t>(threads, lines / 64));
  if (n == 1) {
    body(0, lines);
    return;
  }
  std::vector<std::thread> pool;
  pool.reserve(static_cast<size_t>(n - 1));
  const int64_t per = (lines + n - 1) / n;
  for (int64_t t = 1; t < n; ++t) {
    const int64_t s = std::min(lines, t * per), e = std::min(lines, s + per);
    pool.emplace_back([&body, s, e] { body(s, e); });
  }
  body(0, std::min(lines, per));
  for (auto& th : pool) th.join();
}

void check(bool ok, const std::string& what) {
  if (!ok) throw std::invalid_argument("fastbert._C_cpu: " + what);
}

// A block of the attention mask into keep, uint8/bool [seqs.size(), num_heads, rows, 8 * groups]
// contiguous: query rows row_start .. row_start + rows - 1, key groups group_start .. group_start
// + groups - 1, sequences seqs (logical indices). Counter = (key group, query row, head,
// sequence). `lengths` empty: every element drawn; else one length per entry of seqs: rows >=
// length and groups starting at or past it are zeros.
void attention_keep(uintptr_t keep_ptr, uint32_t k0, uint32_t k1, uint32_t threshold, const std::vector<int64_t>& seqs,
                    int64_t num_heads, int64_t row_start, int64_t rows, int64_t group_start, int64_t groups,
                    const std::vector<int64_t>& lengths, int threads) {
  check(keep_ptr != 0, "keep is a null pointer");
  check(num_heads >= 0 && rows >= 0 && groups >= 0 && row_start >= 0 && group_start >= 0, "negative size or start");
  check(lengths.empty() || lengths.size() == seqs.size(),
        "lengths has " + std::to_string(lengths.size()) + " entries, expected one per sequence (" +
            std::to_string(seqs.size()) + ")");
  check(threshold < 65536u, "threshold must be < 65536, got " + std::to_string(threshold));
  uint8_t* keep = reinterpret_cast<uint8_t*>(keep_ptr);
  const int64_t row_bytes = kColumnsPerCall * groups;
  py::gil_scoped_release nogil;
  parallel_lines(static_cast<int64_t>(seqs.size()) * num_heads * rows, threads, [&](int64_t s, int64_t e) {
    for (int64_t line = s; line < e; ++line) {
      const int64_t row = row_start + line % rows, sh = line / rows;
      const int64_t head = sh % num_heads, b = sh / num_heads;
      int64_t valid = groups;
      if (!lengths.empty()) {
        const int64_t n = lengths[static_cast<size_t>(b)];
        valid = row < n ? std::clamp<int64_t>((n + kColumnsPerCall - 1) / kColumnsPerCall - group_start, 0, groups) : 0;
      }
      keep_line(keep + line * row_bytes, group_start, groups, valid, static_cast<uint32_t>(row),
                static_cast<uint32_t>(head), static_cast<uint32_t>(seqs[static_cast<size_t>(b)]), k0, k1, threshold);
    }
  });
}

// Rows row_start .. row_start + num_rows - 1 of the LayerNorm mask into keep, uint8/bool
// [num_rows, 8 * groups] contiguous. Counter = (group, row low word, row high word, 0).
void rows_keep(uintptr_t keep_ptr, uint32_t k0, uint32_t k1, uint32_t threshold, uint64_t row_start, int64_t num_rows,
               int64_t groups, int threads) {
  check(keep_ptr != 0, "keep is a null pointer");
  check(num_rows >= 0 && groups >= 0, "negative size");
  check(threshold < 65536u, "threshold must be < 65536, got " + std::to_string(threshold));
  uint8_t* keep = reinterpret_cast<uint8_t*>(keep_ptr);
  const int64_t row_bytes = kColumnsPerCall * groups;
  py::gil_scoped_release nogil;
  parallel_lines(num_rows, threads, [&](int64_t s, int64_t e) {
    for (int64_t i = s; i < e; ++i) {
      const uint64_t r = row_start + static_cast<uint64_t>(i);
      keep_line(keep + i * row_bytes, 0, groups, groups, static_cast<uint32_t>(r & 0xFFFFFFFFu),
                static_cast<uint32_t>(r >> 32), 0u, k0, k1, threshold);
    }
  });
}

}  // namespace

PYBIND11_MODULE(_C_cpu, m) {
  m.doc() = "fastbert CPU helpers: the shared dropout keep masks, compiled (private raw-pointer API)";
  m.def("version", [] { return std::string(FASTBERT_VERSION); }, "The fastbert version this module was built for.");
  m.def("attention_keep", &attention_keep, py::arg("keep"), py::arg("k0"), py::arg("k1"), py::arg("threshold"),
        py::arg("seqs"), py::arg("num_heads"), py::arg("row_start"), py::arg("rows"), py::arg("group_start"),
        py::arg("groups"), py::arg("lengths"), py::arg("threads"),
        "A block of the attention keep mask into uint8 [len(seqs), num_heads, rows, 8 * groups] at address `keep`.");
  m.def("rows_keep", &rows_keep, py::arg("keep"), py::arg("k0"), py::arg("k1"), py::arg("threshold"),
        py::arg("row_start"), py::arg("num_rows"), py::arg("groups"), py::arg("threads"),
        "Rows of the LayerNorm keep mask into uint8 [num_rows, 8 * groups] at address `keep`.");
}
