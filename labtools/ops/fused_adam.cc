// Keras 3's Adam update for one variable, in one pass over memory instead of twelve.
//
// Keras computes, op by op (keras/src/optimizers/adam.py):
//   m += (g - m) * c1;  v += (g*g - v) * c2;  w -= (m * alpha) / (sqrt(v) + eps)
// with c1 = 1 - beta_1, c2 = 1 - beta_2 as float32 and alpha from the step count. This kernel does the
// same float32 operations in the same order for each element, so its results are bit-identical; it
// must be compiled without FMA contraction or fast-math (labtools/fused_adam.py does).
// The gradient is read from `grad` starting at element `offset`, so one flat buffer (the Allreduce's)
// serves every variable without being split. Output: the sum of g*g over this variable (for the norm).
#define EIGEN_USE_THREADS  // training_op_helpers.h instantiates the CPU (thread pool) device
#include <cmath>

#include "tensorflow/core/framework/op.h"
#include "tensorflow/core/framework/op_kernel.h"
#include "tensorflow/core/framework/shape_inference.h"
#include "tensorflow/core/kernels/training_op_helpers.h"

using namespace tensorflow;
using CPUDevice = Eigen::ThreadPoolDevice;

REGISTER_OP("LabtoolsAdamUpdate")
    .Input("var: resource")
    .Input("m: resource")
    .Input("v: resource")
    .Input("grad: float")
    .Input("offset: int64")
    .Input("alpha: float")
    .Input("c1: float")
    .Input("c2: float")
    .Input("eps: float")
    .Output("sumsq: float")
    .SetShapeFn(shape_inference::ScalarShape);

class LabtoolsAdamUpdateOp : public OpKernel {
 public:
  explicit LabtoolsAdamUpdateOp(OpKernelConstruction* ctx) : OpKernel(ctx) {}

  void Compute(OpKernelContext* ctx) override {
    auto locks = MaybeLockVariableInputMutexesInOrder<CPUDevice, float>(ctx, /*do_lock=*/true,
                                                                       /*sparse=*/false, {0, 1, 2});
    Tensor var, m, v;
    OP_REQUIRES_OK(ctx, GetInputTensorFromVariable<CPUDevice, float>(ctx, 0, true, false, &var));
    OP_REQUIRES_OK(ctx, GetInputTensorFromVariable<CPUDevice, float>(ctx, 1, true, false, &m));
    OP_REQUIRES_OK(ctx, GetInputTensorFromVariable<CPUDevice, float>(ctx, 2, true, false, &v));
    const Tensor& grad = ctx->input(3);
    const int64_t offset = ctx->input(4).scalar<int64_t>()();
    const int64_t n = var.NumElements();
    OP_REQUIRES(ctx, m.NumElements() == n && v.NumElements() == n,
                absl::InvalidArgumentError("m and v must have the variable's size"));
    OP_REQUIRES(ctx, offset >= 0 && offset + n <= grad.NumElements(),
                absl::InvalidArgumentError("grad[offset:offset+n] is out of range"));
    const float alpha = ctx->input(5).scalar<float>()();
    const float c1 = ctx->input(6).scalar<float>()();
    const float c2 = ctx->input(7).scalar<float>()();
    const float eps = ctx->input(8).scalar<float>()();

    const float* g = grad.flat<float>().data() + offset;
    float* w = var.flat<float>().data();
    float* mp = m.flat<float>().data();
    float* vp = v.flat<float>().data();
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) {  // SIMD lanes do IEEE float32 math, element by element
      const float gi = g[i];
      const float mi = mp[i] + (gi - mp[i]) * c1;
      const float vi = vp[i] + (gi * gi - vp[i]) * c2;
      mp[i] = mi;
      vp[i] = vi;
      w[i] = w[i] - (mi * alpha) / (std::sqrt(vi) + eps);
    }
    double sumsq = 0.0;  // a statistic, not state: its summation order may differ from TF's
#pragma omp simd reduction(+ : sumsq)
    for (int64_t i = 0; i < n; ++i) sumsq += static_cast<double>(g[i]) * g[i];
    Tensor* out = nullptr;
    OP_REQUIRES_OK(ctx, ctx->allocate_output(0, TensorShape({}), &out));
    out->scalar<float>()() = static_cast<float>(sumsq);
  }
};

REGISTER_KERNEL_BUILDER(Name("LabtoolsAdamUpdate").Device(DEVICE_CPU), LabtoolsAdamUpdateOp);
