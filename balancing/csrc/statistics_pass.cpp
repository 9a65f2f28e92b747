// A lagged coefficient rule's statistics step on a CPU in one pass over the task gradients
// (RepresentationBoundary._start_statistics): the Gram's dot products and the weighted sum with the
// held coefficients read each G_k once, a block at a time, where six torch.dot calls and the sum's
// mul and add_ read them nine times (docs/performance.md).
//
// The sum does what concord.balancing.base.weighted_sum does, element by element: G_first * c (c
// rounded to the gradients' dtype, as ATen rounds a Python scalar), then one fused multiply-add per
// further task, as ATen's add_(g, alpha) does where its kernels are vectorised. The dot products are
// summed in lanes of the gradients' dtype within a block and in float64 across blocks.
#include <torch/extension.h>

#include <algorithm>
#include <cmath>
#include <utility>
#include <vector>

namespace {

constexpr int64_t kBlock = 2048;  // elements a task per block: T blocks stay in the first-level cache
constexpr int kLanes = 16;

template <typename T>
inline __attribute__((always_inline)) void one_pass(const std::vector<const T*>& g, const std::vector<T>& c,
                                                    const std::vector<bool>& keep, T* out, int64_t n,
                                                    const std::vector<std::pair<int, int>>& pairs, double* products) {
  const int tasks = static_cast<int>(g.size());
  std::vector<double> total(pairs.size(), 0.0);
  for (int64_t start = 0; start < n; start += kBlock) {
    const int64_t len = std::min(kBlock, n - start);
    for (size_t p = 0; p < pairs.size(); ++p) {
      const T* a = g[pairs[p].first] + start;
      const T* b = g[pairs[p].second] + start;
      T lanes[kLanes] = {};
      int64_t i = 0;
      for (; i + kLanes <= len; i += kLanes)
        for (int l = 0; l < kLanes; ++l) lanes[l] += a[i + l] * b[i + l];
      double block = 0.0;
      for (; i < len; ++i) block += static_cast<double>(a[i]) * static_cast<double>(b[i]);
      for (int l = 0; l < kLanes; ++l) block += static_cast<double>(lanes[l]);
      total[p] += block;
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
  }
  std::copy(total.begin(), total.end(), products);
}

#if defined(__x86_64__)
#define CONCORD_FMA_TARGET __attribute__((target("avx2,fma")))
template <typename T>
CONCORD_FMA_TARGET void one_pass_fma(const std::vector<const T*>& g, const std::vector<T>& c, const std::vector<bool>& keep,
                                     T* out, int64_t n, const std::vector<std::pair<int, int>>& pairs, double* products) {
  one_pass<T>(g, c, keep, out, n, pairs, products);
}
bool has_fma() { return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma"); }
#else
template <typename T>
void one_pass_fma(const std::vector<const T*>& g, const std::vector<T>& c, const std::vector<bool>& keep, T* out,
                  int64_t n, const std::vector<std::pair<int, int>>& pairs, double* products) {
  one_pass<T>(g, c, keep, out, n, pairs, products);
}
bool has_fma() { return true; }  // std::fma is an instruction on the other architectures PyTorch ships for
#endif

template <typename T>
void run(const std::vector<at::Tensor>& grads, const std::vector<double>& coefficients, const std::vector<bool>& keep,
         const at::Tensor& out, const std::vector<std::pair<int, int>>& pairs, double* products) {
  std::vector<const T*> g;
  for (const auto& t : grads) g.push_back(t.data_ptr<T>());
  std::vector<T> c(coefficients.begin(), coefficients.end());
  T* o = out.defined() ? out.data_ptr<T>() : nullptr;
  static const bool with_fma = has_fma();
  if (with_fma) {
    one_pass_fma<T>(g, c, keep, o, grads[0].numel(), pairs, products);
  } else {
    one_pass<T>(g, c, keep, o, grads[0].numel(), pairs, products);
  }
}

}  // namespace

// `grads`: the present task gradients (contiguous, one shape, float32 or float64, on the CPU);
// `keep`: those the sum takes, with `coefficients`. Returns the sum (undefined if none is kept) and
// the Gram's entries in float64: <G_k, G_k> for each, then (`cross_terms`) <G_i, G_j> for i < j,
// the order of concord.balancing.statistics._gram_pairs.
std::vector<at::Tensor> gram_and_sum(std::vector<at::Tensor> grads, std::vector<double> coefficients, std::vector<bool> keep,
                                     bool cross_terms, bool donate_first) {
  TORCH_CHECK(!grads.empty() && grads.size() == coefficients.size() && grads.size() == keep.size(),
              "gram_and_sum: one coefficient and one keep flag per gradient");
  const auto dtype = grads[0].scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kDouble, "gram_and_sum: float32 or float64 gradients");
  for (const auto& g : grads) {
    TORCH_CHECK(g.device().is_cpu() && g.is_contiguous() && g.scalar_type() == dtype && g.sizes() == grads[0].sizes(),
                "gram_and_sum: contiguous CPU gradients of one shape and dtype");
  }
  const int tasks = static_cast<int>(grads.size());
  std::vector<std::pair<int, int>> pairs;
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
  if (dtype == at::kFloat) {
    run<float>(grads, coefficients, keep, out, pairs, products.data_ptr<double>());
  } else {
    run<double>(grads, coefficients, keep, out, pairs, products.data_ptr<double>());
  }
  return {out, products};
}
