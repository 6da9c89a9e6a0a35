// Keras 3's Adam update for every variable of a model, in one op and one pass over memory per variable.
//
// Keras computes, op by op for each variable (keras/src/optimizers/adam.py):
//   m += (g - m) * c1;  v += (g*g - v) * c2;  w -= (m * alpha) / (sqrt(v) + eps)
// with c1 = 1 - beta_1, c2 = 1 - beta_2 as float32 and alpha from the step count. This kernel does the
// same float32 operations in the same order for each element, so its results are bit-identical; it
// must be compiled without FMA contraction or fast-math (labtools/opbuild.py does).
// Gradients: one tensor per variable, or one flat buffer holding them in order (the Allreduce's),
// read at offsets without being split. One op for all variables, because TensorFlow's per-op cost
// (locking, lookup, scheduling: ~15 us) times 52 variables was a third of the update.
// Output: the sum of g*g over all variables (for the gradient norm).
#define EIGEN_USE_THREADS  // training_op_helpers.h instantiates the CPU (thread pool) device
#include <cmath>
#include <vector>

#include "tensorflow/core/framework/op.h"
#include "tensorflow/core/framework/op_kernel.h"
#include "tensorflow/core/framework/shape_inference.h"
#include "tensorflow/core/kernels/training_op_helpers.h"

#include "adam_update.h"

using namespace tensorflow;
using CPUDevice = Eigen::ThreadPoolDevice;

REGISTER_OP("LabtoolsAdamUpdate")
    .Attr("N: int >= 1")
    .Attr("G: int >= 1")
    .Input("var: N * resource")
    .Input("m: N * resource")
    .Input("v: N * resource")
    .Input("grad: G * float")
    .Input("alpha: float")
    .Input("c1: float")
    .Input("c2: float")
    .Input("eps: float")
    .Output("sumsq: float")
    .SetShapeFn(shape_inference::ScalarShape);

class LabtoolsAdamUpdateOp : public OpKernel {
 public:
  explicit LabtoolsAdamUpdateOp(OpKernelConstruction* ctx) : OpKernel(ctx) {
    OP_REQUIRES_OK(ctx, ctx->GetAttr("N", &n_));
    OP_REQUIRES_OK(ctx, ctx->GetAttr("G", &g_));
    OP_REQUIRES(ctx, g_ == n_ || g_ == 1,
                absl::InvalidArgumentError("grad: one tensor per variable, or one flat buffer"));
  }

  void Compute(OpKernelContext* ctx) override {
    std::vector<int> ids(3 * n_);
    for (int i = 0; i < 3 * n_; ++i) ids[i] = i;
    auto locks = MaybeLockVariableInputMutexesInOrder<CPUDevice, float>(ctx, /*do_lock=*/true,
                                                                       /*sparse=*/false, ids);
    const int s = 3 * n_ + g_;  // the scalars follow the gradients
    const float alpha = ctx->input(s).scalar<float>()();
    const float c1 = ctx->input(s + 1).scalar<float>()();
    const float c2 = ctx->input(s + 2).scalar<float>()();
    const float eps = ctx->input(s + 3).scalar<float>()();
    const bool flat = g_ == 1 && n_ > 1;
    const Tensor& buf = ctx->input(3 * n_);
    int64_t offset = 0;
    double sumsq = 0.0;
    for (int i = 0; i < n_; ++i) {
      Tensor var, m, v;
      OP_REQUIRES_OK(ctx, GetInputTensorFromVariable<CPUDevice, float>(ctx, i, true, false, &var));
      OP_REQUIRES_OK(ctx, GetInputTensorFromVariable<CPUDevice, float>(ctx, n_ + i, true, false, &m));
      OP_REQUIRES_OK(ctx, GetInputTensorFromVariable<CPUDevice, float>(ctx, 2 * n_ + i, true, false, &v));
      const int64_t n = var.NumElements();
      OP_REQUIRES(ctx, m.NumElements() == n && v.NumElements() == n,
                  absl::InvalidArgumentError("m and v must have the variable's size"));
      const Tensor& grad = flat ? buf : ctx->input(3 * n_ + i);
      const int64_t at = flat ? offset : 0;
      OP_REQUIRES(ctx, at + n <= grad.NumElements() && (flat || grad.NumElements() == n),
                  absl::InvalidArgumentError("a gradient does not match its variable's size"));
      sumsq += adam_update(grad.flat<float>().data() + at, var.flat<float>().data(), m.flat<float>().data(),
                           v.flat<float>().data(), n, alpha, c1, c2, eps);
      offset += n;
    }
    Tensor* out = nullptr;
    OP_REQUIRES_OK(ctx, ctx->allocate_output(0, TensorShape({}), &out));
    out->scalar<float>()() = static_cast<float>(sumsq);
  }

 private:
  int n_ = 0, g_ = 0;
};

REGISTER_KERNEL_BUILDER(Name("LabtoolsAdamUpdate").Device(DEVICE_CPU), LabtoolsAdamUpdateOp);
