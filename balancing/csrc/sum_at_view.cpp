// The backward of the boundary's one-view step (RepresentationBoundary, autograd_sums) as a C++
// autograd node: autograd has summed the task gradients at the view; this node scales that sum by the
// step's coefficient (in place when nothing else holds it) and leaves the rank's whole contribution
// out if a task loss or the sum is not finite. The Python node it replaces spent more time in the
// interpreter than in this arithmetic (docs/performance.md). The Python side reads the outcome from
// `state` (float64): [0] objective() was called, [1] the losses were finite, [2] out: the sum was not
// finite, [3] out: the sum was scaled in place, [4] and [5] out: start and end (steady clock, seconds).
#include <torch/extension.h>

#include <chrono>
#include <cmath>

namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

// How many references a gradient that nothing but autograd's buffers and this node hold has, measured
// once by `probe` (it depends on how the engine passes gradients to a C++ node).
int64_t alone_references = -1;

double now() {
  return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count();
}

struct Probe : public torch::autograd::Function<Probe> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, at::Tensor record) {
    ctx->saved_data["record"] = record;
    return x.view_as(x);
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    at::Tensor g = grads[0];
    grads.clear();
    ctx->saved_data["record"].toTensor().data_ptr<double>()[0] = static_cast<double>(g.use_count());
    return {g, at::Tensor()};
  }
};

struct SumAtView : public torch::autograd::Function<SumAtView> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& z, double coefficient, at::Tensor state) {
    ctx->saved_data["coefficient"] = coefficient;
    ctx->saved_data["state"] = state;
    return z.view_as(z);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    double* state = ctx->saved_data["state"].toTensor().data_ptr<double>();
    state[4] = now();
    TORCH_CHECK(state[0] != 0.0,
                "RepresentationBoundary.objective(losses) must be called before backward so the balancer sees the task losses");
    state[0] = 0.0;
    at::Tensor total = grads[0];
    grads.clear();
    const bool donated = alone_references > 0 && total.use_count() <= alone_references &&
                         total.storage().use_count() == 1 && total.is_contiguous();
    const double coefficient = ctx->saved_data["coefficient"].toDouble();
    at::Tensor aggregated = total;
    if (coefficient != 1.0) {
      aggregated = donated ? total.mul_(coefficient) : total.mul(coefficient);
    }
    const bool losses_finite = state[1] != 0.0;
    const bool finite = losses_finite && std::isfinite(aggregated.sum().item<double>());
    if (!finite) {
      aggregated = (aggregated.is_same(total) && !donated) ? at::zeros_like(total) : aggregated.zero_();
    }
    state[2] = (losses_finite && !finite) ? 1.0 : 0.0;
    state[3] = donated ? 1.0 : 0.0;
    state[5] = now();
    return {aggregated, at::Tensor(), at::Tensor()};
  }
};

}  // namespace

at::Tensor probe(const at::Tensor& x, at::Tensor record) { return Probe::apply(x, record); }

void set_alone_references(int64_t count) { alone_references = count; }

at::Tensor sum_at_view(const at::Tensor& z, double coefficient, at::Tensor state) {
  return SumAtView::apply(z, coefficient, state);
}
