// The boundary's passes over the task gradients on a CPU (concord/balancing/native.py), a block at a
// time, so that each gradient is read once: the weighted sum A = sum_k c_k G_k, with the Gram's dot
// products of a lagged rule's statistics step (gram_and_sum) or with the check that every element of
// A is finite (the compiled nodes in nodes.cpp, which this file precedes in one translation unit).
// Torch's own ops read the gradients once for each mul, add_, dot and sum (docs/performance.md).
//
// The sum does what concord.balancing.base.weighted_sum does, element by element: G_first * c (c
// rounded to the gradients' dtype, as ATen rounds a Python scalar), then one fused multiply-add per
// further task, as ATen's add_(g, alpha) does where its kernels are vectorised. The dot products are
// summed in lanes of the gradients' dtype within a block and in float64 across blocks.
#include <torch/extension.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <utility>
#include <vector>

namespace concord {

constexpr int64_t kBlock = 2048;  // elements a task per block: T blocks stay in the first-level cache
constexpr int kLanes = 16;

using Pairs = std::vector<std::pair<int, int>>;

// Blocks [begin, end): block b's dot products go to products_by_block[b * pairs.size() + p], and
// (with `check`) the sum over its elements x of x * 0, which is 0 for finite x and NaN for an inf or
// a NaN, to checks_by_block[b].
template <typename T>
inline __attribute__((always_inline)) void blocks(const std::vector<const T*>& g, const std::vector<T>& c,
                                                  const std::vector<bool>& keep, T* out, int64_t n, const Pairs& pairs,
                                                  double* products_by_block, T* checks_by_block, bool check,
                                                  int64_t begin, int64_t end) {
  const int tasks = static_cast<int>(g.size());
  for (int64_t b = begin; b < end; ++b) {
    const int64_t start = b * kBlock;
    const int64_t len = std::min(kBlock, n - start);
    for (size_t p = 0; p < pairs.size(); ++p) {
      const T* x = g[pairs[p].first] + start;
      const T* y = g[pairs[p].second] + start;
      T lanes[kLanes] = {};
      int64_t i = 0;
      for (; i + kLanes <= len; i += kLanes)
        for (int l = 0; l < kLanes; ++l) lanes[l] += x[i + l] * y[i + l];
      double block = 0.0;
      for (; i < len; ++i) block += static_cast<double>(x[i]) * static_cast<double>(y[i]);
      for (int l = 0; l < kLanes; ++l) block += static_cast<double>(lanes[l]);
      products_by_block[b * pairs.size() + p] = block;
    }
    if (out == nullptr) continue;
    T* o = out + start;
    bool first = true;
    for (int k = 0; k < tasks; ++k) {
      if (!keep[k]) continue;
      const T* gk = g[k] + start;
      const T ck = c[k];
      if (first) {
        for (int64_t i = 0; i < len; ++i) o[i] = gk[i] * ck;
        first = false;
      } else {
        for (int64_t i = 0; i < len; ++i) o[i] = std::fma(gk[i], ck, o[i]);
      }
    }
    if (check) {
      T lanes[kLanes] = {};
      int64_t i = 0;
      for (; i + kLanes <= len; i += kLanes)
        for (int l = 0; l < kLanes; ++l) lanes[l] += o[i + l] * T(0);
      for (; i < len; ++i) lanes[0] += o[i] * T(0);
      T nonfinite = 0;
      for (int l = 0; l < kLanes; ++l) nonfinite += lanes[l];
      checks_by_block[b] = nonfinite;
    }
  }
}

template <typename T>
using BlocksFn = void (*)(const std::vector<const T*>&, const std::vector<T>&, const std::vector<bool>&, T*, int64_t,
                          const Pairs&, double*, T*, bool, int64_t, int64_t);

template <typename T>
void blocks_plain(const std::vector<const T*>& g, const std::vector<T>& c, const std::vector<bool>& keep, T* out, int64_t n,
                  const Pairs& pairs, double* products, T* checks, bool check, int64_t begin, int64_t end) {
  blocks<T>(g, c, keep, out, n, pairs, products, checks, check, begin, end);
}

#if defined(__x86_64__)
template <typename T>
__attribute__((target("avx2,fma"))) void blocks_fma(const std::vector<const T*>& g, const std::vector<T>& c,
                                                    const std::vector<bool>& keep, T* out, int64_t n, const Pairs& pairs,
                                                    double* products, T* checks, bool check, int64_t begin, int64_t end) {
  blocks<T>(g, c, keep, out, n, pairs, products, checks, check, begin, end);
}
bool has_fma() { return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma"); }
template <typename T>
BlocksFn<T> blocks_here() {
  return has_fma() ? blocks_fma<T> : blocks_plain<T>;
}
#else
template <typename T>
BlocksFn<T> blocks_here() {
  return blocks_plain<T>;  // std::fma is an instruction on the other architectures PyTorch ships for
}
#endif

// The blocks are shared among torch's intra-op threads, as torch's own element-wise ops are; each
// block's dot products are kept apart and summed in block order, so the result does not depend on
// the number of threads.
template <typename T>
bool typed_pass(const std::vector<at::Tensor>& grads, const std::vector<double>& coefficients, const std::vector<bool>& keep,
                const at::Tensor& out, const Pairs& pairs, double* products, bool check) {
  std::vector<const T*> g;
  for (const auto& t : grads) g.push_back(t.data_ptr<T>());
  std::vector<T> c(coefficients.begin(), coefficients.end());
  T* o = out.defined() ? out.data_ptr<T>() : nullptr;
  const int64_t n = grads[0].numel();
  const int64_t count = (n + kBlock - 1) / kBlock;
  std::vector<double> by_block(count * pairs.size(), 0.0);
  std::vector<T> checks(count, T(0));
  static const BlocksFn<T> run = blocks_here<T>();
  at::parallel_for(0, count, std::max<int64_t>(1, at::internal::GRAIN_SIZE / kBlock), [&](int64_t begin, int64_t end) {
    run(g, c, keep, o, n, pairs, by_block.data(), checks.data(), check, begin, end);
  });
  for (size_t p = 0; p < pairs.size(); ++p) {
    double total = 0.0;
    for (int64_t b = 0; b < count; ++b) total += by_block[b * pairs.size() + p];
    products[p] = total;
  }
  T nonfinite = 0;
  for (const T x : checks) nonfinite += x;
  return nonfinite == 0;
}

// Whether sum_pass takes `tensors`: contiguous CPU float32 or float64 tensors of one dtype and shape.
bool passable(const std::vector<at::Tensor>& tensors) {
  if (tensors.empty()) return false;
  const auto dtype = tensors[0].scalar_type();
  if (dtype != at::kFloat && dtype != at::kDouble) return false;
  for (const auto& t : tensors) {
    if (!t.device().is_cpu() || !t.is_contiguous() || t.scalar_type() != dtype || t.sizes() != tensors[0].sizes()) return false;
  }
  return true;
}

// out = sum over the tasks `keep` of c_k G_k (`out` may be the first kept gradient, read before it is
// written, block by block; undefined: no sum); `products` gets the Gram's entries `pairs`. Returns,
// with `check`, whether every element of out is finite.
bool sum_pass(const std::vector<at::Tensor>& grads, const std::vector<double>& coefficients, const std::vector<bool>& keep,
              const at::Tensor& out, const Pairs& pairs, double* products, bool check) {
  if (grads[0].scalar_type() == at::kFloat) return typed_pass<float>(grads, coefficients, keep, out, pairs, products, check);
  return typed_pass<double>(grads, coefficients, keep, out, pairs, products, check);
}

// CoGrad's rule (concord.balancing.cograd), a block at a time: its aggregate
//   A = sum_k c_k G_k ⊙ (1 - clamp(kappa G_k ⊙ (S' - gamma_k G_k), -1, 1)),   S' = sum_j gamma_j G_j,
// and, on a statistics step, its norms in the same pass (transference_norms: ||G_k||^2, ||P||^2,
// ||C||^2 and, with `costs` (the guard's), <G_k, C>, with P = sum_k c_k G_k, C = sum_k c_k G_k ⊙ G_k ⊙ (S' - gamma_k G_k)), summed in lanes of the
// gradients' dtype within a block and in float64 across blocks, in block order. Without the norms,
// A is formed as kappa S' = sum_j (kappa gamma_j) G_j and G_k ⊙ (c_k - c_k clamp(G_k ⊙ (kappa S' -
// kappa gamma_k G_k))): fewer operations than the rule as written, so its last bits differ from the
// compiled rule's as those differ from the eager rule's. Written with GCC's vector types: the
// compiler's own vectorisation gave up on the clamp. The clamp keeps a NaN, as torch.clamp does.
// Each block's check as in `blocks`.
constexpr int kMaxNormTasks = 16;

// How many numbers CoGrad's norms are for `tasks` gradients: ||G_k||^2 each, ||P||^2, ||C||^2, and with
// `costs` <G_k, C> each (the layout transference_norms in concord.balancing.cograd returns).
constexpr int64_t cograd_norm_count(int64_t tasks, bool costs) { return (costs ? 2 : 1) * tasks + 2; }

template <typename T, int Bytes>
struct VectorOf;
template <int Bytes>
struct VectorOf<float, Bytes> {
  typedef float type __attribute__((vector_size(Bytes)));
};
template <int Bytes>
struct VectorOf<double, Bytes> {
  typedef double type __attribute__((vector_size(Bytes)));
};

template <typename V, typename T>
inline __attribute__((always_inline)) V load(const T* p) {
  V v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

template <typename T>
inline __attribute__((always_inline)) T clamp_unit(T f) {  // scalars and vectors alike; a NaN stays
  const T upper = T{} + 1, lower = T{} - 1;
  f = lower > f ? lower : f;
  return upper < f ? upper : f;
}

template <typename T>
struct Coordinated {
  std::vector<const T*> g;
  std::vector<T> c, gamma, kappa_gamma;
  T kappa;
  T* out;  // null: the norms alone
  int64_t n;
  T* checks_by_block;
  double* norms_by_block;  // null: no norms; else T + 2 a block, 2 T + 2 with `costs`
  bool costs;  // with the norms, <G_k, C> for each task too
  double* telemetry_by_block;  // null: no telemetry; else 3 a block (without the norms only)
};

// The rule at one element (E = T) or one vector of elements (E = V); `x(k)`: task k's gradient there.
// With the norms, each term's share is added to `squares` (T, then with `costs` <G_k, C> for each
// task after them), `plain2` and `correction2`. With
// `telemetry` (without the norms), the terms of correction_telemetry in concord.balancing.cograd are
// added to it: P^2 (P = sum_k c_k G_k), (A - P)^2, and how many of the factors the bound met; the
// aggregate is the same, bit for bit.
template <typename E, typename T, typename Load>
inline __attribute__((always_inline)) E coordinated_at(const Coordinated<T>& a, bool norms, const Load& x, E* squares,
                                                      E& plain2, E& correction2, E* telemetry) {
  const int tasks = static_cast<int>(a.g.size());
  const auto& c = a.c;
  E aggregated = E{};
  if (!norms) {
    E s = a.kappa_gamma[0] * x(0);
    for (int k = 1; k < tasks; ++k) s = a.kappa_gamma[k] * x(k) + s;
    for (int k = 0; k < tasks; ++k) {
      const E xk = x(k);
      aggregated = xk * (c[k] - c[k] * clamp_unit(xk * (s - a.kappa_gamma[k] * xk))) + aggregated;
    }
    if (telemetry == nullptr) return aggregated;
    // A loop of its own: folded into the one above, the compiler rounded the aggregate differently.
    const E zero = E{}, one = E{} + 1;
    E plain = E{}, bounded = E{};
    for (int k = 0; k < tasks; ++k) {
      const E xk = x(k);
      const E factor = xk * (s - a.kappa_gamma[k] * xk);
      plain = c[k] * xk + plain;
      const E size = factor < zero ? -factor : factor;
      bounded += size > one ? one : zero;
    }
    const E change = aggregated - plain;
    telemetry[0] += plain * plain;
    telemetry[1] += change * change;
    telemetry[2] += bounded;
    return aggregated;
  }
  E s = a.gamma[0] * x(0);
  for (int k = 1; k < tasks; ++k) s = a.gamma[k] * x(k) + s;
  E plain = E{}, correction = E{};
  for (int k = 0; k < tasks; ++k) {
    const E xk = x(k);
    const E v = xk * (s - a.gamma[k] * xk);
    squares[k] += xk * xk;
    plain = c[k] * xk + plain;
    correction = c[k] * (xk * v) + correction;
    aggregated = xk * (c[k] - c[k] * clamp_unit(a.kappa * v)) + aggregated;
  }
  plain2 += plain * plain;
  correction2 += correction * correction;
  if (a.costs)
    for (int k = 0; k < tasks; ++k) squares[tasks + k] += x(k) * correction;
  return aggregated;
}

template <typename T, int Bytes>
inline __attribute__((always_inline)) void coordinated_blocks(const Coordinated<T>& a, int64_t begin, int64_t end) {
  using V = typename VectorOf<T, Bytes>::type;
  constexpr int kWidth = Bytes / sizeof(T);
  const int tasks = static_cast<int>(a.g.size());
  const bool norms = a.norms_by_block != nullptr, telemetry = a.telemetry_by_block != nullptr;
  const auto& g = a.g;
  for (int64_t b = begin; b < end; ++b) {
    const int64_t start = b * kBlock;
    const int64_t stop = start + std::min(kBlock, a.n - start);
    V lanes = V{}, plain2 = V{}, correction2 = V{};
    V squares[2 * kMaxNormTasks] = {};
    V measured[3] = {};
    int64_t i = start;
    for (; i + kWidth <= stop; i += kWidth) {
      const V aggregated = coordinated_at<V>(a, norms, [&](int k) __attribute__((always_inline)) { return load<V>(g[k] + i); }, squares, plain2, correction2,
                                             telemetry ? measured : nullptr);
      if (a.out != nullptr) {
        std::memcpy(a.out + i, &aggregated, sizeof aggregated);
        lanes += aggregated * T(0);
      }
    }
    T nonfinite = 0, plain2_tail = 0, correction2_tail = 0;
    T squares_tail[2 * kMaxNormTasks] = {};
    T measured_tail[3] = {};
    for (; i < stop; ++i) {
      const T aggregated = coordinated_at<T>(a, norms, [&](int k) __attribute__((always_inline)) { return g[k][i]; }, squares_tail, plain2_tail, correction2_tail,
                                             telemetry ? measured_tail : nullptr);
      if (a.out != nullptr) {
        a.out[i] = aggregated;
        nonfinite += aggregated * T(0);
      }
    }
    for (int l = 0; l < kWidth; ++l) nonfinite += lanes[l];
    a.checks_by_block[b] = nonfinite;
    const auto lane_sum = [&](const V& v, T tail) {
      double total = static_cast<double>(tail);
      for (int l = 0; l < kWidth; ++l) total += static_cast<double>(v[l]);
      return total;
    };
    if (telemetry)
      for (int j = 0; j < 3; ++j) a.telemetry_by_block[b * 3 + j] = lane_sum(measured[j], measured_tail[j]);
    if (!norms) continue;
    double* block = a.norms_by_block + b * cograd_norm_count(tasks, a.costs);
    for (int k = 0; k < tasks; ++k) block[k] = lane_sum(squares[k], squares_tail[k]);
    block[tasks] = lane_sum(plain2, plain2_tail);
    block[tasks + 1] = lane_sum(correction2, correction2_tail);
    if (a.costs)
      for (int k = 0; k < tasks; ++k) block[tasks + 2 + k] = lane_sum(squares[tasks + k], squares_tail[tasks + k]);
  }
}

template <typename T>
using CoordinatedFn = void (*)(const Coordinated<T>&, int64_t, int64_t);

template <typename T>
void coordinated_plain(const Coordinated<T>& a, int64_t begin, int64_t end) {
  coordinated_blocks<T, 16>(a, begin, end);
}

// The vector width the CPU has (64 bytes: AVX-512, 32: AVX2, 16: any), or the one a test asked for
// (use_vector_width in the module: each is then run on one machine). The compiler fuses multiplies and
// adds where the target has FMA (AVX2, AVX-512: the same bits at either width); the 16-byte variant
// on x86 has none and rounds differently.
int forced_vector_bytes = 0;

#if defined(__x86_64__)
template <typename T>
__attribute__((target("avx2,fma"))) void coordinated_avx2(const Coordinated<T>& a, int64_t begin, int64_t end) {
  coordinated_blocks<T, 32>(a, begin, end);
}
template <typename T>
__attribute__((target("avx512f"))) void coordinated_avx512(const Coordinated<T>& a, int64_t begin, int64_t end) {
  coordinated_blocks<T, 64>(a, begin, end);
}
std::vector<int64_t> vector_widths() {
  std::vector<int64_t> widths = {16};
  if (has_fma()) widths.push_back(32);
  if (__builtin_cpu_supports("avx512f")) widths.push_back(64);
  return widths;
}
template <typename T>
CoordinatedFn<T> coordinated_here() {
  static const int64_t widest = vector_widths().back();
  const int64_t bytes = forced_vector_bytes != 0 ? forced_vector_bytes : widest;
  return bytes == 64 ? coordinated_avx512<T> : bytes == 32 ? coordinated_avx2<T> : coordinated_plain<T>;
}
#else
std::vector<int64_t> vector_widths() { return {16}; }
template <typename T>
CoordinatedFn<T> coordinated_here() {
  return coordinated_plain<T>;
}
#endif

// Returns whether every element of out is finite; with `norms`, fills it (float64, T + 2; 2 T + 2
// with `costs`); with
// `telemetry` (and no norms), fills it (float64, 3: see coordinated_at).
template <typename T>
bool typed_coordinated(const std::vector<at::Tensor>& grads, const std::vector<double>& coefficients,
                       const std::vector<double>& gamma, double kappa, const at::Tensor& out, double* norms, double* telemetry,
                       bool costs) {
  Coordinated<T> a;
  for (const auto& t : grads) a.g.push_back(t.data_ptr<T>());
  a.c.assign(coefficients.begin(), coefficients.end());
  a.gamma.assign(gamma.begin(), gamma.end());
  for (const double gamma_k : gamma) a.kappa_gamma.push_back(static_cast<T>(kappa * gamma_k));
  a.kappa = static_cast<T>(kappa);
  a.out = out.defined() ? out.data_ptr<T>() : nullptr;
  a.costs = costs;
  a.n = grads[0].numel();
  const int64_t count = (a.n + kBlock - 1) / kBlock;
  const int64_t per_block = cograd_norm_count(static_cast<int64_t>(grads.size()), costs);
  std::vector<T> checks(count, T(0));
  std::vector<double> by_block(norms != nullptr ? count * per_block : 0, 0.0);
  std::vector<double> telemetry_by_block(telemetry != nullptr ? count * 3 : 0, 0.0);
  a.checks_by_block = checks.data();
  a.norms_by_block = norms != nullptr ? by_block.data() : nullptr;
  a.telemetry_by_block = telemetry != nullptr && norms == nullptr ? telemetry_by_block.data() : nullptr;
  const CoordinatedFn<T> run = coordinated_here<T>();
  at::parallel_for(0, count, std::max<int64_t>(1, at::internal::GRAIN_SIZE / kBlock),
                   [&](int64_t begin, int64_t end) { run(a, begin, end); });
  if (norms != nullptr) {
    for (int64_t j = 0; j < per_block; ++j) {
      double total = 0.0;
      for (int64_t b = 0; b < count; ++b) total += by_block[b * per_block + j];
      norms[j] = total;
    }
  }
  if (telemetry != nullptr && norms == nullptr) {  // not a.telemetry_by_block: with no element it is null, and 0s are due
    for (int64_t j = 0; j < 3; ++j) {
      double total = 0.0;
      for (int64_t b = 0; b < count; ++b) total += telemetry_by_block[b * 3 + j];
      telemetry[j] = total;
    }
  }
  T nonfinite = 0;
  for (const T x : checks) nonfinite += x;
  return nonfinite == 0;
}

// out = CoGrad's aggregate over `grads` (see concord::passable; `out` may be one of them: each element
// is read before it is written; undefined: the norms alone); `norms` (T + 2 doubles, 2 T + 2 with
// `costs`, at most kMaxNormTasks tasks) or null. Returns whether every element of out is finite.
bool coordinated_pass(const std::vector<at::Tensor>& grads, const std::vector<double>& coefficients,
                      const std::vector<double>& gamma, double kappa, const at::Tensor& out, double* norms = nullptr,
                      double* telemetry = nullptr, bool costs = false) {
  if (grads[0].scalar_type() == at::kFloat) return typed_coordinated<float>(grads, coefficients, gamma, kappa, out, norms, telemetry, costs);
  return typed_coordinated<double>(grads, coefficients, gamma, kappa, out, norms, telemetry, costs);
}

}  // namespace concord

// A lagged rule's statistics step (RepresentationBoundary._statistics_and_sum). `grads`: the present
// task gradients (see concord::passable); `keep`: those the sum takes, with `coefficients`, formed in
// grads[0] where `donate_first` and it is kept. Returns the sum (undefined if no task is kept) and the
// Gram's entries in float64: <G_k, G_k> for each, then (`cross_terms`) <G_i, G_j> for i < j, the order
// of concord.balancing.statistics._gram_pairs.
std::vector<at::Tensor> gram_and_sum(std::vector<at::Tensor> grads, std::vector<double> coefficients, std::vector<bool> keep,
                                     bool cross_terms, bool donate_first) {
  TORCH_CHECK(grads.size() == coefficients.size() && grads.size() == keep.size(),
              "gram_and_sum: one coefficient and one keep flag per gradient");
  TORCH_CHECK(concord::passable(grads), "gram_and_sum: contiguous CPU float32 or float64 gradients of one shape");
  const int tasks = static_cast<int>(grads.size());
  concord::Pairs pairs;
  for (int k = 0; k < tasks; ++k) pairs.emplace_back(k, k);
  if (cross_terms)
    for (int i = 0; i < tasks; ++i)
      for (int j = i + 1; j < tasks; ++j) pairs.emplace_back(i, j);
  at::Tensor products = at::empty({static_cast<int64_t>(pairs.size())}, at::kDouble);
  at::Tensor out;
  if (donate_first && keep[0]) {
    out = grads[0];
  } else if (std::find(keep.begin(), keep.end(), true) != keep.end()) {
    out = at::empty_like(grads[0]);
  }
  concord::sum_pass(grads, coefficients, keep, out, pairs, products.data_ptr<double>(), false);
  return {out, products};
}

// CoGrad's step on a CPU (concord.balancing.cograd.CoGrad): its aggregate over `grads` (see
// concord::passable) with `kappa` where `form` (in grads[0] where `donate_first`), and with `norms`
// its transference norms [||G_k||^2 .., ||P||^2, ||C||^2] and with `costs` <G_k, C> .. after them
// (float64), in one pass. Returns {the
// aggregate (undefined without `form`), its check (0 where every element is finite, else NaN, in
// the gradients' dtype), the norms (undefined without `norms`)}.
std::vector<at::Tensor> cograd_pass(std::vector<at::Tensor> grads, std::vector<double> coefficients, std::vector<double> gamma,
                                    double kappa, bool form, bool donate_first, bool norms, bool costs) {
  TORCH_CHECK(!grads.empty() && grads.size() == coefficients.size() && grads.size() == gamma.size(),
              "cograd_pass: one coefficient and one gamma per gradient");
  TORCH_CHECK(concord::passable(grads), "cograd_pass: contiguous CPU float32 or float64 gradients of one shape");
  TORCH_CHECK(!norms || grads.size() <= concord::kMaxNormTasks, "cograd_pass: norms for at most 16 tasks");
  at::Tensor out = form ? (donate_first ? grads[0] : at::empty_like(grads[0])) : at::Tensor();
  at::Tensor squares = norms ? at::empty({concord::cograd_norm_count(static_cast<int64_t>(grads.size()), costs)}, at::kDouble) : at::Tensor();
  const bool finite = concord::coordinated_pass(grads, coefficients, gamma, kappa, out, norms ? squares.data_ptr<double>() : nullptr, nullptr, costs);
  at::Tensor check = at::full({}, finite ? 0.0 : std::nan(""), grads[0].options());
  return {out, check, squares};
}

// CoGrad's aggregate over `grads` with `kappa` (a new tensor), as cograd_pass forms it, bit for bit,
// and in the same pass its logged telemetry (correction_telemetry in concord.balancing.cograd):
// {the aggregate, its check (0 where every element is finite, else NaN), [||P||^2, ||A - P||^2, how
// many of the factors the bound met] (float64)}.
std::vector<at::Tensor> cograd_telemetry_pass(std::vector<at::Tensor> grads, std::vector<double> coefficients,
                                              std::vector<double> gamma, double kappa) {
  TORCH_CHECK(!grads.empty() && grads.size() == coefficients.size() && grads.size() == gamma.size(),
              "cograd_telemetry_pass: one coefficient and one gamma per gradient");
  TORCH_CHECK(concord::passable(grads), "cograd_telemetry_pass: contiguous CPU float32 or float64 gradients of one shape");
  at::Tensor out = at::empty_like(grads[0]);
  at::Tensor measured = at::empty({3}, at::kDouble);
  const bool finite = concord::coordinated_pass(grads, coefficients, gamma, kappa, out, nullptr, measured.data_ptr<double>());
  at::Tensor check = at::full({}, finite ? 0.0 : std::nan(""), grads[0].options());
  return {out, check, measured};
}

// The vector widths (bytes) CoGrad's pass can use on this CPU, widest last.
std::vector<int64_t> vector_widths() { return concord::vector_widths(); }

// From now on CoGrad's pass uses `bytes`-wide vectors (0: the widest this CPU has). For tests.
void use_vector_width(int64_t bytes) {
  const std::vector<int64_t> widths = concord::vector_widths();
  TORCH_CHECK(bytes == 0 || std::find(widths.begin(), widths.end(), bytes) != widths.end(),
              "use_vector_width: this CPU has no ", bytes, "-byte vectors");
  concord::forced_vector_bytes = bytes;
}
