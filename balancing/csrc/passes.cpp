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

// CoGrad's aggregate (concord.balancing.cograd.coordinated), a block at a time:
//   A = sum_k c_k G_k ⊙ (1 - clamp(kappa G_k ⊙ (S' - gamma_k G_k), -1, 1)),   S' = sum_j gamma_j G_j,
// formed as kappa S' = sum_j (kappa gamma_j) G_j and G_k ⊙ (c_k - c_k clamp(G_k ⊙ (kappa S' - kappa gamma_k
// G_k))): fewer operations than the rule as written, so its last bits differ from the compiled rule's
// as those differ from the eager rule's. Written with GCC's vector types: the compiler's own
// vectorisation gave up on the clamp. The clamp keeps a NaN, as torch.clamp does (x86's max and min
// return their second operand where either is NaN). Blocks' checks as in `blocks`.
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
inline __attribute__((always_inline)) T clamp_unit(T f) {
  const T one = 1;
  f = -one > f ? -one : f;
  return one < f ? one : f;
}

template <typename T, int Bytes>
inline __attribute__((always_inline)) void coordinated_blocks(const std::vector<const T*>& g, const std::vector<T>& c,
                                                              const std::vector<T>& kg, T* out, int64_t n,
                                                              T* checks_by_block, int64_t begin, int64_t end) {
  using V = typename VectorOf<T, Bytes>::type;
  constexpr int kWidth = Bytes / sizeof(T);
  const int tasks = static_cast<int>(g.size());
  const V upper = V{} + T(1), lower = V{} - T(1);
  for (int64_t b = begin; b < end; ++b) {
    const int64_t start = b * kBlock;
    const int64_t len = std::min(kBlock, n - start);
    T* o = out + start;
    V lanes = V{};
    int64_t i = start;
    for (; i + kWidth <= start + len; i += kWidth) {
      V s = kg[0] * load<V>(g[0] + i);
      for (int k = 1; k < tasks; ++k) s = kg[k] * load<V>(g[k] + i) + s;
      V aggregated = V{};
      for (int k = 0; k < tasks; ++k) {
        const V x = load<V>(g[k] + i);
        V f = x * (s - kg[k] * x);
        f = lower > f ? lower : f;
        f = upper < f ? upper : f;
        aggregated = x * (c[k] - c[k] * f) + aggregated;
      }
      std::memcpy(o + (i - start), &aggregated, sizeof aggregated);
      lanes += aggregated * T(0);
    }
    T nonfinite = 0;
    for (; i < start + len; ++i) {
      T s = kg[0] * g[0][i];
      for (int k = 1; k < tasks; ++k) s = kg[k] * g[k][i] + s;
      T aggregated = 0;
      for (int k = 0; k < tasks; ++k) {
        const T x = g[k][i];
        aggregated = x * (c[k] - c[k] * clamp_unit(x * (s - kg[k] * x))) + aggregated;
      }
      o[i - start] = aggregated;
      nonfinite += aggregated * T(0);
    }
    for (int l = 0; l < kWidth; ++l) nonfinite += lanes[l];
    checks_by_block[b] = nonfinite;
  }
}

template <typename T>
using CoordinatedFn = void (*)(const std::vector<const T*>&, const std::vector<T>&, const std::vector<T>&, T*, int64_t, T*,
                               int64_t, int64_t);

template <typename T>
void coordinated_plain(const std::vector<const T*>& g, const std::vector<T>& c, const std::vector<T>& kg, T* out, int64_t n,
                       T* checks, int64_t begin, int64_t end) {
  coordinated_blocks<T, 16>(g, c, kg, out, n, checks, begin, end);
}

#if defined(__x86_64__)
template <typename T>
__attribute__((target("avx2,fma"))) void coordinated_avx2(const std::vector<const T*>& g, const std::vector<T>& c,
                                                          const std::vector<T>& kg, T* out, int64_t n, T* checks,
                                                          int64_t begin, int64_t end) {
  coordinated_blocks<T, 32>(g, c, kg, out, n, checks, begin, end);
}
template <typename T>
__attribute__((target("avx512f"))) void coordinated_avx512(const std::vector<const T*>& g, const std::vector<T>& c,
                                                           const std::vector<T>& kg, T* out, int64_t n, T* checks,
                                                           int64_t begin, int64_t end) {
  coordinated_blocks<T, 64>(g, c, kg, out, n, checks, begin, end);
}
template <typename T>
CoordinatedFn<T> coordinated_here() {
  if (__builtin_cpu_supports("avx512f")) return coordinated_avx512<T>;
  return has_fma() ? coordinated_avx2<T> : coordinated_plain<T>;
}
#else
template <typename T>
CoordinatedFn<T> coordinated_here() {
  return coordinated_plain<T>;
}
#endif

template <typename T>
bool typed_coordinated(const std::vector<at::Tensor>& grads, const std::vector<double>& coefficients,
                       const std::vector<double>& gamma, double kappa, const at::Tensor& out) {
  std::vector<const T*> g;
  for (const auto& t : grads) g.push_back(t.data_ptr<T>());
  std::vector<T> c(coefficients.begin(), coefficients.end());
  std::vector<T> kg;
  for (const double gamma_k : gamma) kg.push_back(static_cast<T>(kappa * gamma_k));
  const int64_t n = grads[0].numel();
  const int64_t count = (n + kBlock - 1) / kBlock;
  std::vector<T> checks(count, T(0));
  static const CoordinatedFn<T> run = coordinated_here<T>();
  T* o = out.data_ptr<T>();
  at::parallel_for(0, count, std::max<int64_t>(1, at::internal::GRAIN_SIZE / kBlock), [&](int64_t begin, int64_t end) {
    run(g, c, kg, o, n, checks.data(), begin, end);
  });
  T nonfinite = 0;
  for (const T x : checks) nonfinite += x;
  return nonfinite == 0;
}

// out = CoGrad's aggregate over `grads` (see concord::passable; `out` may be one of them: each element
// is read before it is written); returns whether every element of out is finite.
bool coordinated_pass(const std::vector<at::Tensor>& grads, const std::vector<double>& coefficients,
                      const std::vector<double>& gamma, double kappa, const at::Tensor& out) {
  if (grads[0].scalar_type() == at::kFloat) return typed_coordinated<float>(grads, coefficients, gamma, kappa, out);
  return typed_coordinated<double>(grads, coefficients, gamma, kappa, out);
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
