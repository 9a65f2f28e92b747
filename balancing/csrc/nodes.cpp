// The backward of the boundary's cheapest steps as C++ autograd nodes (concord/balancing/native.py);
// the Python nodes they replace spent more time in the interpreter than in this arithmetic
// (docs/performance.md). Each does what its Python node does, the same operations in the same order,
// the sum and its check in one pass over the gradients where passes.cpp takes them (the check then
// asks whether every element is finite; the Python node's, whether their sum is).
//
// SumAtView, the one-view step (RepresentationBoundary, autograd_sums): autograd has summed the task
// gradients at the view; the node scales that sum by the step's coefficient (in place when nothing
// else holds it) and leaves the rank's whole contribution out if a task loss or the sum is not finite.
// Its `state` (float64): [0] objective() was called, [1] the losses were finite, [2] out: the sum was
// not finite, [3] out: the sum was scaled in place, [4] and [5] out: start and end (seconds), [6] the
// coefficient (written by the boundary when it changes, so a step passes the node nothing else).
#include <ATen/ScalarOps.h>
#include <torch/csrc/autograd/function.h>
#include <torch/csrc/autograd/functions/utils.h>
#include <torch/extension.h>

#include <chrono>
#include <cmath>

namespace {

using torch::autograd::variable_list;

// How many references a gradient that nothing but autograd's buffers and this node hold has, measured
// once by `probe` (it depends on how the engine passes gradients to a C++ node).
int64_t alone_references = -1;

// A Python float as torch's Python API passes it to an op: a wrapped number. A C++ double passed as
// a Scalar takes another kernel, which rounds half-precision products differently.
at::Tensor number(double x) { return at::native::wrapped_scalar_tensor(x); }

double now() {
  return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count();
}

// The nodes are autograd Nodes of their own rather than torch::autograd::Function's: a Function's
// apply (its context, its checks of inputs and outputs, its views) cost the forward pass more than
// the node's work with the caches cold (docs/performance.md). Each output is an alias of `z` (its
// storage and version counter) whose gradient goes to the node: `z`'s own history is untouched.
// A Function's outputs are views that refuse in-place changes; an alias would take one silently and
// every head would read it, so the node refuses to run if `z` or any alias was changed in place.
struct AliasNode : public torch::autograd::Node {
  c10::VariableVersion versions;  // z's, shared with its aliases
  uint32_t version = 0;
  void check_unchanged() const {
    TORCH_CHECK(versions.current_version() == version,
                "RepresentationBoundary: the shared representation z, or a task head's view of it, was modified in place "
                "after the boundary's forward (e.g. an inplace=True activation at the start of a head): every head reads the "
                "same memory, so use an out-of-place operation there");
  }
};

template <typename NodeType>
variable_list aliases_into(const at::Tensor& z, const c10::intrusive_ptr<NodeType>& node, int64_t count) {
  node->set_next_edges(torch::autograd::collect_next_edges(z));
  node->versions = torch::autograd::impl::version_counter(z);
  node->version = node->versions.current_version();
  variable_list outputs;
  outputs.reserve(count);
  for (int64_t k = 0; k < count; ++k) {
    outputs.push_back(z.detach());
    torch::autograd::set_history(outputs.back(), node);
  }
  return outputs;
}

// A node's backward starts: its state, its start time stamped at state[clock], and the check that
// objective() ran for this step (state[0], consumed).
double* start_backward(const at::Tensor& state_tensor, int clock) {
  double* state = state_tensor.data_ptr<double>();
  state[clock] = now();
  TORCH_CHECK(state[0] != 0.0,
              "RepresentationBoundary.objective(losses) must be called before backward so the balancer sees the task losses");
  state[0] = 0.0;
  return state;
}

// Nothing but autograd's buffers and this node holds `g` (no other reference, no view of its storage):
// a sum may be formed in it, as autograd accumulates in place.
bool given_up(const at::Tensor& g) {
  return alone_references > 0 && g.use_count() <= alone_references && g.storage().use_count() == 1 && g.is_contiguous();
}

struct Probe : public AliasNode {
  at::Tensor record;
  std::string name() const override { return "ConcordProbeBackward"; }
  variable_list apply(variable_list&& grads) override {
    check_unchanged();
    at::Tensor g = grads[0];
    grads.clear();
    record.data_ptr<double>()[0] = static_cast<double>(g.use_count());
    return {g};
  }
};

struct SumAtView : public AliasNode {
  at::Tensor state_tensor;
  std::string name() const override { return "ConcordSumAtViewBackward"; }
  variable_list apply(variable_list&& grads) override {
    check_unchanged();
    double* state = start_backward(state_tensor, 4);
    at::Tensor total = grads[0];
    grads.clear();
    const bool donated = given_up(total);
    const double coefficient = state[6];
    at::Tensor aggregated = total;
    bool sum_finite = true;
    if (coefficient != 1.0 && concord::passable({total})) {
      aggregated = donated ? total : at::empty_like(total);
      sum_finite = concord::sum_pass({total}, {coefficient}, {true}, aggregated, {}, nullptr, true);
    } else {
      if (coefficient != 1.0) aggregated = donated ? total.mul_(number(coefficient)) : total.mul(number(coefficient));
      sum_finite = std::isfinite(aggregated.sum().item<double>());
    }
    const bool losses_finite = state[1] != 0.0;
    const bool finite = losses_finite && sum_finite;
    if (!finite) {
      aggregated = (aggregated.is_same(total) && !donated) ? at::zeros_like(total) : aggregated.zero_();
    }
    state[2] = (losses_finite && !finite) ? 1.0 : 0.0;
    state[3] = donated ? 1.0 : 0.0;
    state[5] = now();
    return {aggregated};
  }
};

// Layout of HeldSum's `state` (float64, 8 + 3T): [0] objective() was called, [1] and [2] start and
// end (seconds), [3] out: the sum was formed in the first task's gradient, [4] out: the sum
// overflowed with every gradient finite, [5] out: the task whose gradient the sum was formed in when
// it was left out with a non-finite one (-1: none), [6] out: another task's gradient was not finite
// then, [7] out: any of [4], [5] or the flags below is to be reported (so that the boundary reads
// them only then); from 8, T flags each: the losses were finite (in), the task had a gradient (out),
// the task's gradient was not finite and was left out (out). Then the step's constants, written by the
// boundary when they change (so a step passes the node nothing else): final scale, kappa, whether there
// is one gamma a task, whether there is one held flag a task; then T each: the coefficients, gamma,
// the held flags.
constexpr int kHeldFlags = 8;
constexpr int kHeldConstants = 4;

// The sum over the tasks `keep` of c_k G_k, in place in G_first when `donate_first`; undefined if
// no task is kept. The same operations, in the same order, as concord.balancing.base.weighted_sum.
at::Tensor weighted_sum(const std::vector<at::Tensor>& grads, const std::vector<double>& c,
                        const std::vector<bool>& keep, int64_t first, bool donate_first) {
  at::Tensor out;
  for (size_t k = 0; k < grads.size(); ++k) {
    if (!keep[k]) continue;
    if (!out.defined()) {
      if (static_cast<int64_t>(k) == first && donate_first) {
        out = c[k] == 1.0 ? grads[k] : grads[k].mul_(number(c[k]));
      } else {
        out = grads[k].mul(number(c[k]));
      }
    } else {
      out.add_(grads[k], c[k]);
    }
  }
  return out;
}

// weighted_sum, and whether every element of the sum is finite (`finite`), in one pass where
// passes.cpp takes the kept gradients, else with torch's ops and the check that their sum is finite.
at::Tensor checked_sum(const std::vector<at::Tensor>& grads, const std::vector<double>& c, const std::vector<bool>& keep,
                       int64_t first, bool donate_first, bool* finite) {
  std::vector<at::Tensor> kept;
  std::vector<double> kept_c;
  for (size_t k = 0; k < grads.size(); ++k) {
    if (keep[k]) {
      kept.push_back(grads[k]);
      kept_c.push_back(c[k]);
    }
  }
  if (!concord::passable(kept)) {
    at::Tensor out = weighted_sum(grads, c, keep, first, donate_first);
    *finite = !out.defined() || std::isfinite(out.sum().item<double>());
    return out;
  }
  // weighted_sum forms the sum in G_first when it is the first kept gradient and given up.
  at::Tensor out = (donate_first && kept[0].is_same(grads[first])) ? grads[first] : at::empty_like(kept[0]);
  *finite = concord::sum_pass(kept, kept_c, std::vector<bool>(kept.size(), true), out, {}, nullptr, true);
  return out;
}

// CoGrad's aggregate (concord.balancing.cograd.coordinated) over the tasks `keep`, formed in G_first
// when `donate_first` and it is the first kept gradient, and whether every element is finite
// (`finite`): in one pass where passes.cpp takes the kept gradients, else with torch's ops (the
// eager rule's), checked by their sum.
at::Tensor checked_coordinated(const std::vector<at::Tensor>& grads, const std::vector<double>& c,
                               const std::vector<double>& gamma, double kappa, const std::vector<bool>& keep, int64_t first,
                               bool donate_first, bool* finite) {
  std::vector<at::Tensor> kept;
  std::vector<double> kept_c, kept_gamma;
  for (size_t k = 0; k < grads.size(); ++k) {
    if (keep[k]) {
      kept.push_back(grads[k]);
      kept_c.push_back(c[k]);
      kept_gamma.push_back(gamma[k]);
    }
  }
  if (!concord::passable(kept)) {
    at::Tensor s = kept[0] * number(kept_gamma[0]);
    for (size_t j = 1; j < kept.size(); ++j) s = s + kept[j] * number(kept_gamma[j]);
    at::Tensor out;
    for (size_t k = 0; k < kept.size(); ++k) {
      const at::Tensor factor = (s - kept[k] * number(kept_gamma[k])) * kept[k] * number(kappa);
      const at::Tensor term = kept[k] * at::rsub(factor.clamp(-1.0, 1.0), 1.0) * number(kept_c[k]);
      out = out.defined() ? out + term : term;
    }
    *finite = std::isfinite(out.sum().item<double>());
    return out;
  }
  at::Tensor out = (donate_first && kept[0].is_same(grads[first])) ? grads[first] : at::empty_like(kept[0]);
  *finite = concord::coordinated_pass(kept, kept_c, kept_gamma, kappa, out);
  return out;
}

bool all_finite(const at::Tensor& t) {
  auto [low, high] = at::aminmax(t);
  return std::isfinite(low.item<double>()) && std::isfinite(high.item<double>());
}

// A step between two sums of a lagged rule (RepresentationBoundary._between_sums): T views of z;
// backward forms sum_k c_k G_k with the held coefficients over the tasks with a gradient and a finite
// loss, and where that sum is not finite, forms it again without the tasks whose gradient is not
// finite (RepresentationBoundary._checked), then scales it by `final_scale`. With `gamma` (one a
// task) and `kappa` != 0, the step of CoGrad's element-wise rule with the last sum's constants
// (RepresentationBoundary._balance_elementwise): CoGrad's aggregate when every task with a gradient
// is taken and was active in the last sum (`held`; empty: all), else, as CoGrad.aggregate leaves
// such a step uncorrected, the plain sum of the tasks taken.
struct HeldSum : public AliasNode {
  at::Tensor state_tensor;
  int64_t tasks = 0;
  std::string name() const override { return "ConcordHeldSumBackward"; }
  variable_list apply(variable_list&& incoming) override {  // a task's gradient undefined where it had none
    check_unchanged();
    double* state = start_backward(state_tensor, 1);
    const double* constants = state + kHeldFlags + 3 * tasks;
    const double final_scale = constants[0], kappa = constants[1];
    const double* first_constant = constants + kHeldConstants;
    const std::vector<double> c(first_constant, first_constant + tasks);
    const std::vector<double> gamma = constants[2] != 0.0 ? std::vector<double>(first_constant + tasks, first_constant + 2 * tasks)
                                                          : std::vector<double>();
    std::vector<int64_t> held;
    if (constants[3] != 0.0) {
      for (int64_t k = 0; k < tasks; ++k) held.push_back(static_cast<int64_t>(first_constant[2 * tasks + k]));
    }
    double* loss_finite = state + kHeldFlags;
    double* had_gradient = loss_finite + tasks;
    double* left_out = had_gradient + tasks;
    std::vector<at::Tensor> grads(incoming.begin(), incoming.end());
    incoming.clear();
    int64_t first = -1;
    std::vector<bool> usable(tasks);
    for (int64_t k = 0; k < tasks; ++k) {
      had_gradient[k] = grads[k].defined() ? 1.0 : 0.0;
      left_out[k] = 0.0;
      usable[k] = grads[k].defined() && loss_finite[k] != 0.0;
      if (first < 0 && grads[k].defined()) first = k;
    }
    variable_list result(1);
    state[3] = state[4] = state[6] = 0.0;
    state[5] = -1.0;
    // Anything to report: a loss that was not finite where the task had a gradient (the gradients'
    // own findings are added below).
    state[7] = 0.0;
    for (int64_t k = 0; k < tasks; ++k) if (had_gradient[k] != 0.0 && loss_finite[k] == 0.0) state[7] = 1.0;
    if (first < 0) {
      state[2] = now();
      return result;
    }
    const at::Tensor& g = grads[first];
    const bool donated = given_up(g);
    int64_t first_usable = -1;
    for (int64_t k = 0; k < tasks && first_usable < 0; ++k) if (usable[k]) first_usable = k;
    const bool donate = donated && first_usable == first;
    state[3] = donate ? 1.0 : 0.0;
    // CoGrad's rule applies where it takes every task with a gradient, each active in the last sum;
    // else the plain sum.
    const auto corrects = [&](const std::vector<bool>& keep) {
      bool all = !gamma.empty() && kappa != 0.0;
      for (int64_t k = 0; k < tasks; ++k) all = all && (!grads[k].defined() || (keep[k] && (held.empty() || held[k] != 0)));
      return all;
    };
    bool finite = true;
    at::Tensor out = corrects(usable) ? checked_coordinated(grads, c, gamma, kappa, usable, first, donate, &finite)
                                      : checked_sum(grads, c, usable, first, donate, &finite);
    if (out.defined() && !finite) {
      const int64_t spent = donate ? first : -1;
      std::vector<bool> keep(tasks);
      bool others_bad = false;
      for (int64_t k = 0; k < tasks; ++k) {
        const bool finite = grads[k].defined() && k != spent && all_finite(grads[k]);
        if (usable[k] && !finite && k != spent) {
          left_out[k] = 1.0;
          others_bad = true;
        }
        keep[k] = usable[k] && finite;
      }
      state[5] = static_cast<double>(spent);
      state[6] = others_bad ? 1.0 : 0.0;
      bool again_finite = true;
      if (corrects(keep)) {
        out = checked_coordinated(grads, c, gamma, kappa, keep, first, false, &again_finite);
      } else {
        out = weighted_sum(grads, c, keep, first, false);
        again_finite = !out.defined() || std::isfinite(out.sum().item<double>());
      }
      if (out.defined() && !again_finite) {
        state[4] = 1.0;
        out.zero_();
      }
      state[7] = 1.0;
    }
    if (!out.defined()) out = at::zeros_like(g);
    if (final_scale != 1.0) out.mul_(number(final_scale));
    result[0] = out;
    state[2] = now();
    return result;
  }
};

}  // namespace

variable_list held_sum(const at::Tensor& z, at::Tensor state, int64_t tasks) {
  auto node = c10::make_intrusive<HeldSum>();
  node->state_tensor = std::move(state);
  node->tasks = tasks;
  return aliases_into(z, node, tasks);
}

// weighted_sum over `grads` (formed in the first where `donate_first`), and whether every element is
// finite, in one pass over the gradients (see concord::passable); for the Python node's steps that form
// a sum with known coefficients (RepresentationBoundary._checked_sum).
std::tuple<at::Tensor, bool> checked_weighted_sum(std::vector<at::Tensor> grads, std::vector<double> coefficients,
                                                  bool donate_first) {
  TORCH_CHECK(!grads.empty() && grads.size() == coefficients.size(), "checked_weighted_sum: one coefficient per gradient");
  TORCH_CHECK(concord::passable(grads), "checked_weighted_sum: contiguous CPU float32 or float64 gradients of one shape");
  bool finite = true;
  at::Tensor out = checked_sum(grads, coefficients, std::vector<bool>(grads.size(), true), 0, donate_first, &finite);
  return {out, finite};
}

at::Tensor probe(const at::Tensor& x, at::Tensor record) {
  auto node = c10::make_intrusive<Probe>();
  node->record = std::move(record);
  return aliases_into(x, node, 1)[0];
}

void set_alone_references(int64_t count) { alone_references = count; }

at::Tensor sum_at_view(const at::Tensor& z, at::Tensor state) {
  auto node = c10::make_intrusive<SumAtView>();
  node->state_tensor = std::move(state);
  return aliases_into(z, node, 1)[0];
}
