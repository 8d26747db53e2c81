// Python's @once_differentiable for the backward of a C++ autograd function (evonorm's extensions include it).
// The backward runs without a graph; under create_graph its gradients then get a node that raises if they are
// differentiated again, instead of passing for constants (which would give a wrong second derivative silently).
#pragma once

#include <torch/csrc/autograd/custom_function.h>
#include <torch/csrc/autograd/functions/basic_ops.h>

namespace evonorm {

template <typename Backward>
torch::autograd::variable_list once_differentiable(const torch::autograd::variable_list& grad_outputs,
                                                   const Backward& backward) {
  bool differentiable = false;
  if (at::GradMode::is_enabled()) {
    for (const auto& g : grad_outputs) differentiable = differentiable || (g.defined() && g.requires_grad());
  }
  torch::autograd::variable_list grads;
  {
    at::NoGradGuard no_grad;
    grads = backward();
  }
  if (!differentiable) return grads;
  for (auto& g : grads) {
    if (g.defined()) g = g.detach().requires_grad_();  // aliases that require grad: the error node attaches to them
  }
  auto error = std::make_shared<torch::autograd::DelayedError>(
      "trying to differentiate twice a function that was marked with @once_differentiable",
      static_cast<int64_t>(grads.size()));
  return error->apply(std::move(grads));
}

}  // namespace evonorm
