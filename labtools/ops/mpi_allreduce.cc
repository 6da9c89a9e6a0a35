// The synchronous step's gradient Allreduce inside the TensorFlow graph.
//
// Replaces a tf.numpy_function round trip (hand the buffer to Python, take the GIL, call mpi4py, hand
// it back) with one MPI_Allreduce on the graph's own buffer, in place when TensorFlow lets the op
// take over its input (the concat that made it has no other reader). Same MPI call, same buffer,
// same sum as mpi4py's: the numbers do not change.
// The communicator arrives as its Fortran handle (mpi4py's Comm.py2f()), which every MPI converts
// back with MPI_Comm_f2c. The buffer's last element is the failure flag (labtools.comm.fail_step): a
// peer that failed joins the Allreduce with it set, and this op then fails with PEER_MARK.
#include <mpi.h>

#include <cstring>

#include "tensorflow/core/framework/op.h"
#include "tensorflow/core/framework/op_kernel.h"
#include "tensorflow/core/framework/shape_inference.h"

using namespace tensorflow;

REGISTER_OP("LabtoolsAllreduce")
    .Input("buf: float")
    .Input("comm_f: int64")
    .Output("sum: float")
    .SetIsStateful()  // a collective: never pruned, merged or reordered
    .SetShapeFn([](shape_inference::InferenceContext* c) {
      c->set_output(0, c->input(0));
      return absl::OkStatus();
    });

class LabtoolsAllreduceOp : public OpKernel {
 public:
  explicit LabtoolsAllreduceOp(OpKernelConstruction* ctx) : OpKernel(ctx) {}

  void Compute(OpKernelContext* ctx) override {
    const Tensor& in = ctx->input(0);
    const MPI_Comm comm = MPI_Comm_f2c(static_cast<MPI_Fint>(ctx->input(1).scalar<int64_t>()()));
    const int64_t n = in.NumElements();
    OP_REQUIRES(ctx, n >= 1 && n <= INT32_MAX, absl::InvalidArgumentError("buffer size out of MPI's int range"));
    Tensor* out = nullptr;
    OP_REQUIRES_OK(ctx, ctx->forward_input_or_allocate_output({0}, 0, in.shape(), &out));
    float* p = out->flat<float>().data();
    if (p != in.flat<float>().data()) std::memcpy(p, in.flat<float>().data(), n * sizeof(float));
    const int rc = MPI_Allreduce(MPI_IN_PLACE, p, static_cast<int>(n), MPI_FLOAT, MPI_SUM, comm);
    OP_REQUIRES(ctx, rc == MPI_SUCCESS, absl::InternalError("MPI_Allreduce failed"));
    OP_REQUIRES(ctx, !(p[n - 1] > 0.0f),
                absl::AbortedError("LABTOOLS_PEER_FAILED: " + std::to_string(static_cast<int>(p[n - 1])) +
                                   " process(es) failed during a synchronous step"));
  }
};

REGISTER_KERNEL_BUILDER(Name("LabtoolsAllreduce").Device(DEVICE_CPU), LabtoolsAllreduceOp);
