// A decode batch's routed experts in one call: each (token, expert) pair computed once, each
// expert's weights read once. The op `nanoseek_kernels::moe_experts`, built and loaded by
// engine/kernels/__init__.py, which also packs the weights (`pack_experts`).
//
//   x [N, d] fp32, weights [N, K] fp32, ids [N, K] int64,
//   gate_up [E, 2 * ceil(I / TILE), d, TILE]: the x @ W matrices [E, d, 2I] in column tiles, the
//       gate half's tiles, then the up half's;
//   down [E, ceil(d / TILE), I, TILE]: [E, I, d] the same way;
//   the matrices in fp32, bf16 or int8; int8 ones with fp32 scales per expert and output column,
//   packed the same way ([E, tiles, 1, TILE])
//   -> out [N, d] fp32 = sum_k weights[:, k] * expert_{ids[:, k]}(x),
//   expert_e(x) = (silu(x @ gate_e) * (x @ up_e)) @ down_e.
//
// Why a kernel: at decode batch sizes an expert sees a few rows, and a step reads every chosen
// expert's weights once. Composed ops either read an expert's weights once per pair (gathered),
// compute every expert on every token (dense), or pay a call per expert (sorted). Here a register
// tile of up to ROWS rows x TILE columns streams one packed tile of weights (K rows of TILE
// contiguous columns: one contiguous block, which the hardware prefetcher follows) past a
// broadcast of each row's x, converting bf16 or int8 weights to fp32 in registers (so the step
// reads half or a quarter of the bytes; accumulation stays fp32).
// Work is split into (expert, column tile) units run in parallel: gate/up -> activations, then
// down -> one output row per pair, then each token's K rows summed, weighted, in a fixed order.
// Every unit writes its own elements, so the result does not depend on the thread count.
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#endif

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <optional>
#include <vector>

namespace {

#if defined(__AVX512F__)
constexpr int LANES = 16;
#elif defined(__AVX__)
constexpr int LANES = 8;
#else
constexpr int LANES = 4;
#endif
constexpr int VECS = LANES == 16 ? 4 : 2;  // vectors per tile row: 64 columns with AVX-512
constexpr int TILE = LANES * VECS;
constexpr int ROWS = 6;  // AVX-512: 6 x 4 accumulators + 4 weight vectors + 1 broadcast of 32

typedef float vec __attribute__((vector_size(LANES * sizeof(float))));

inline vec load(const float* p) {
  vec v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

inline void store(float* p, vec v) { std::memcpy(p, &v, sizeof v); }

// LANES weights as fp32: bf16 is a float's high half; int8 converts exactly
inline vec load_weights(const float* p) { return load(p); }

inline vec load_weights(const at::BFloat16* p) {
  typedef uint16_t halves __attribute__((vector_size(LANES * 2)));
  typedef uint32_t words __attribute__((vector_size(LANES * 4)));
  halves h;
  std::memcpy(&h, p, sizeof h);
  const words w = __builtin_convertvector(h, words) << 16;
  vec v;
  std::memcpy(&v, &w, sizeof v);
  return v;
}

inline vec load_weights(const int8_t* p) {
  // GCC's vector conversion of int8 goes element by element: sign-extend with the instructions
#if defined(__AVX512F__)
  const __m512 f = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i*)p)));
#elif defined(__AVX2__)
  const __m256 f = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i*)p)));
#else
  float f[LANES];
  for (int i = 0; i < LANES; ++i) f[i] = p[i];
#endif
  vec v;
  std::memcpy(&v, &f, sizeof v);
  return v;
}

// out[r, 0:TILE] = scale * sum_k a[r][k] * w[k, 0:TILE] for R rows (a's rows by pointer; w one
// packed tile of k_len rows; scale, one fp32 per column, or null)
template <int R, typename W>
void tile(const float* const* a, const W* w, const float* scale, int64_t k_len, float* out) {
  vec acc[R][VECS] = {};
  for (int64_t k = 0; k < k_len; ++k) {
    vec b[VECS];
    for (int v = 0; v < VECS; ++v) b[v] = load_weights(w + k * TILE + v * LANES);
    for (int r = 0; r < R; ++r) {
      const vec s = vec{} + a[r][k];
      for (int v = 0; v < VECS; ++v) acc[r][v] += s * b[v];
    }
  }
  for (int r = 0; r < R; ++r)
    for (int v = 0; v < VECS; ++v)
      store(out + r * TILE + v * LANES, scale ? acc[r][v] * load(scale + v * LANES) : acc[r][v]);
}

// up to ROWS rows x one packed tile -> out [rows, TILE]
template <typename W>
void product(const float* const* a, int64_t rows, const W* w, const float* scale, int64_t k_len,
             float* out) {
  switch (rows) {
    case 1: tile<1>(a, w, scale, k_len, out); break;
    case 2: tile<2>(a, w, scale, k_len, out); break;
    case 3: tile<3>(a, w, scale, k_len, out); break;
    case 4: tile<4>(a, w, scale, k_len, out); break;
    case 5: tile<5>(a, w, scale, k_len, out); break;
    default: tile<ROWS>(a, w, scale, k_len, out); break;
  }
}

inline int64_t tiles(int64_t n) { return (n + TILE - 1) / TILE; }

const float* scales_of(const std::optional<at::Tensor>& s) {
  return s ? s->data_ptr<float>() : nullptr;
}

template <typename W>
void experts(const at::Tensor& x, const at::Tensor& weights, const at::Tensor& ids,
             const at::Tensor& gate_up, const at::Tensor& down,
             const std::optional<at::Tensor>& gate_up_scale,
             const std::optional<at::Tensor>& down_scale, at::Tensor& out) {
  const int64_t n = x.size(0), k = ids.size(1), d = x.size(1), e_count = gate_up.size(0);
  const int64_t inner = down.size(2), act_tiles = tiles(inner), out_tiles = tiles(d);
  const int64_t pairs = n * k;

  // the pairs grouped by expert (a counting sort; ids outside [0, E) are an error)
  const int64_t* id = ids.data_ptr<int64_t>();
  std::vector<int64_t> start(e_count + 1, 0), order(pairs);
  for (int64_t p = 0; p < pairs; ++p) {
    TORCH_CHECK(id[p] >= 0 && id[p] < e_count, "moe_experts: expert id ", id[p], " out of range");
    ++start[id[p] + 1];
  }
  for (int64_t e = 0; e < e_count; ++e) start[e + 1] += start[e];
  {
    std::vector<int64_t> fill(start.begin(), start.end() - 1);
    for (int64_t p = 0; p < pairs; ++p) order[fill[id[p]]++] = p;
  }
  const float* xp = x.data_ptr<float>();
  std::vector<const float*> x_rows(pairs);  // each sorted pair's token row
  for (int64_t s = 0; s < pairs; ++s) x_rows[s] = xp + order[s] / k * d;

  // gate/up: unit (expert, tile of the activations) -> act [pairs (sorted), I]
  std::vector<float> act(pairs * inner);
  const W* gu = gate_up.data_ptr<W>();
  const float* gu_scale = scales_of(gate_up_scale);
  at::parallel_for(0, e_count * act_tiles, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> gate(ROWS * TILE), up(ROWS * TILE);
    for (int64_t u = begin; u < end; ++u) {
      const int64_t e = u / act_tiles, t = u % act_tiles, col = t * TILE;
      const int64_t width = std::min<int64_t>(TILE, inner - col);
      const int64_t gate_tile = e * 2 * act_tiles + t, up_tile = gate_tile + act_tiles;
      const float* g_scale = gu_scale ? gu_scale + gate_tile * TILE : nullptr;
      const float* u_scale = gu_scale ? gu_scale + up_tile * TILE : nullptr;
      for (int64_t s0 = start[e]; s0 < start[e + 1]; s0 += ROWS) {
        const int64_t rows = std::min<int64_t>(ROWS, start[e + 1] - s0);
        product(&x_rows[s0], rows, gu + gate_tile * d * TILE, g_scale, d, gate.data());
        product(&x_rows[s0], rows, gu + up_tile * d * TILE, u_scale, d, up.data());
        for (int64_t r = 0; r < rows; ++r)
          for (int64_t c = 0; c < width; ++c) {
            const float g = gate[r * TILE + c];
            act[(s0 + r) * inner + col + c] = g / (1.f + std::exp(-g)) * up[r * TILE + c];
          }
      }
    }
  });

  // down: unit (expert, tile of the d output columns) -> ys [pairs (token order), d]
  std::vector<float> ys(pairs * d);
  std::vector<const float*> act_rows(pairs);
  for (int64_t s = 0; s < pairs; ++s) act_rows[s] = act.data() + s * inner;
  const W* dn = down.data_ptr<W>();
  const float* dn_scale = scales_of(down_scale);
  at::parallel_for(0, e_count * out_tiles, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> y(ROWS * TILE);
    for (int64_t u = begin; u < end; ++u) {
      const int64_t e = u / out_tiles, t = u % out_tiles, col = t * TILE;
      const int64_t width = std::min<int64_t>(TILE, d - col);
      const int64_t down_tile = e * out_tiles + t;
      const float* scale = dn_scale ? dn_scale + down_tile * TILE : nullptr;
      for (int64_t s0 = start[e]; s0 < start[e + 1]; s0 += ROWS) {
        const int64_t rows = std::min<int64_t>(ROWS, start[e + 1] - s0);
        product(&act_rows[s0], rows, dn + down_tile * inner * TILE, scale, inner, y.data());
        for (int64_t r = 0; r < rows; ++r)
          std::memcpy(&ys[order[s0 + r] * d + col], &y[r * TILE], width * sizeof(float));
      }
    }
  });

  // each token's K outputs, weighted, in a fixed order
  float* op = out.data_ptr<float>();
  const float* wp = weights.data_ptr<float>();
  at::parallel_for(0, n, 1, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      float* o = op + i * d;
      std::fill(o, o + d, 0.f);
      for (int64_t j = 0; j < k; ++j) {
        const float w = wp[i * k + j];
        const float* y = &ys[(i * k + j) * d];
        for (int64_t c = 0; c < d; ++c) o[c] += w * y[c];
      }
    }
  });
}

void check_scale(const std::optional<at::Tensor>& scale, const at::Tensor& w, const char* name) {
  if (w.scalar_type() != at::kChar) {
    TORCH_CHECK(!scale, "moe_experts: ", name, "_scale is for int8 matrices only");
    return;
  }
  TORCH_CHECK(scale && scale->scalar_type() == at::kFloat && scale->is_contiguous() &&
                  scale->dim() == 4 && scale->size(0) == w.size(0) &&
                  scale->size(1) == w.size(1) && scale->size(2) == 1 && scale->size(3) == TILE,
              "moe_experts: int8 ", name, " needs its fp32 scales packed as [E, tiles, 1, ", TILE,
              "]");
}

at::Tensor moe_experts(const at::Tensor& x, const at::Tensor& weights, const at::Tensor& ids,
                       const at::Tensor& gate_up, const at::Tensor& down,
                       const std::optional<at::Tensor>& gate_up_scale,
                       const std::optional<at::Tensor>& down_scale) {
  TORCH_CHECK(x.dim() == 2 && ids.dim() == 2 && weights.sizes() == ids.sizes() &&
                  ids.size(0) == x.size(0),
              "moe_experts: x [N, d], weights and ids [N, K]");
  const int64_t d = x.size(1), e_count = gate_up.size(0);
  TORCH_CHECK(gate_up.dim() == 4 && down.dim() == 4 && down.size(0) == e_count &&
                  gate_up.size(1) == 2 * tiles(down.size(2)) && gate_up.size(2) == d &&
                  gate_up.size(3) == TILE && down.size(1) == tiles(d) && down.size(3) == TILE,
              "moe_experts: gate_up [E, d, 2I] and down [E, I, d] packed in tiles of ", TILE,
              " columns (engine.kernels.pack_experts) for x [N, d]");
  for (const at::Tensor* t : {&x, &weights})
    TORCH_CHECK(t->scalar_type() == at::kFloat && t->is_contiguous() && t->device().is_cpu(),
                "moe_experts: x and weights float32, contiguous, on the CPU");
  TORCH_CHECK(ids.scalar_type() == at::kLong && ids.is_contiguous(), "moe_experts: int64 ids");
  TORCH_CHECK(gate_up.scalar_type() == down.scalar_type() && gate_up.is_contiguous() &&
                  down.is_contiguous(),
              "moe_experts: gate_up and down of one dtype, contiguous");
  check_scale(gate_up_scale, gate_up, "gate_up");
  check_scale(down_scale, down, "down");
  at::Tensor out = at::empty({x.size(0), d}, x.options());
  switch (gate_up.scalar_type()) {
    case at::kFloat:
      experts<float>(x, weights, ids, gate_up, down, gate_up_scale, down_scale, out);
      break;
    case at::kBFloat16:
      experts<at::BFloat16>(x, weights, ids, gate_up, down, gate_up_scale, down_scale, out);
      break;
    case at::kChar:
      experts<int8_t>(x, weights, ids, gate_up, down, gate_up_scale, down_scale, out);
      break;
    default:
      TORCH_CHECK(false, "moe_experts: matrices in float32, bfloat16 or int8, not ",
                  gate_up.scalar_type());
  }
  return out;
}

// x [N, in] fp32 @ w (packed [tiles, in, TILE], fp32/bf16/int8 with scale [tiles, 1, TILE])
// -> [N, out] fp32: a plain product whose few rows share each streamed tile of weights
template <typename W>
void linear_into(const at::Tensor& x, const at::Tensor& w, const float* scale, at::Tensor& out) {
  const int64_t n = x.size(0), k_len = x.size(1), n_tiles = w.size(0), cols = out.size(1);
  const float* xp = x.data_ptr<float>();
  std::vector<const float*> rows(n);
  for (int64_t i = 0; i < n; ++i) rows[i] = xp + i * k_len;
  const W* wp = w.data_ptr<W>();
  float* op = out.data_ptr<float>();
  at::parallel_for(0, n_tiles, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> y(ROWS * TILE);
    for (int64_t t = begin; t < end; ++t) {
      const int64_t col = t * TILE, width = std::min<int64_t>(TILE, cols - col);
      const float* s = scale ? scale + t * TILE : nullptr;
      for (int64_t r0 = 0; r0 < n; r0 += ROWS) {
        const int64_t r_count = std::min<int64_t>(ROWS, n - r0);
        product(&rows[r0], r_count, wp + t * k_len * TILE, s, k_len, y.data());
        for (int64_t r = 0; r < r_count; ++r)
          std::memcpy(op + (r0 + r) * cols + col, &y[r * TILE], width * sizeof(float));
      }
    }
  });
}

at::Tensor linear(const at::Tensor& x, const at::Tensor& w, const std::optional<at::Tensor>& scale,
                  int64_t out_features) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat && x.is_contiguous() &&
                  x.device().is_cpu(),
              "linear: x [N, in] float32, contiguous, on the CPU");
  TORCH_CHECK(w.dim() == 3 && w.is_contiguous() && w.size(1) == x.size(1) && w.size(2) == TILE &&
                  out_features > 0 && tiles(out_features) == w.size(0),
              "linear: w [in, out] packed in tiles of ", TILE, " columns (engine.kernels.pack_linear)",
              " for x [N, in] and out_features");
  if (w.scalar_type() == at::kChar) {
    TORCH_CHECK(scale && scale->scalar_type() == at::kFloat && scale->is_contiguous() &&
                    scale->numel() == w.size(0) * TILE,
                "linear: int8 w needs its fp32 scales packed as [tiles, 1, ", TILE, "]");
  } else {
    TORCH_CHECK(!scale, "linear: scale is for int8 matrices only");
  }
  at::Tensor out = at::empty({x.size(0), out_features}, x.options());
  const float* s = scales_of(scale);
  switch (w.scalar_type()) {
    case at::kFloat: linear_into<float>(x, w, s, out); break;
    case at::kBFloat16: linear_into<at::BFloat16>(x, w, s, out); break;
    case at::kChar: linear_into<int8_t>(x, w, s, out); break;
    default: TORCH_CHECK(false, "linear: w in float32, bfloat16 or int8, not ", w.scalar_type());
  }
  return out;
}

int64_t tile_width() { return TILE; }

}  // namespace

TORCH_LIBRARY(nanoseek_kernels, m) {
  m.def(
      "moe_experts(Tensor x, Tensor weights, Tensor ids, Tensor gate_up, Tensor down, "
      "Tensor? gate_up_scale=None, Tensor? down_scale=None) -> Tensor");
  m.def("linear(Tensor x, Tensor w, Tensor? scale, int out_features) -> Tensor");
  m.def("tile_width() -> int", &tile_width);  // no tensors to dispatch on: one kernel for all
}

TORCH_LIBRARY_IMPL(nanoseek_kernels, CPU, m) {
  m.impl("moe_experts", &moe_experts);
  m.impl("linear", &linear);
}
