// The package's CUDA kernels (runtime/backends/kernels/guided_step.cu) compiled as plain C++ for
// the host, so CI without a GPU runs their arithmetic, indexing and operation order against
// numpy (tests/test_unclip_device_step.py). The shims below stand for the CUDA built-ins the
// kernels use; every "thread" runs in turn. Built with -ffp-contract=off, as NVRTC with
// --fmad=false. What this cannot check: the GPU's own float64 exp (libdevice vs glibc, both
// within an ulp of float64, rounded to float32 after) - the GPU test does.
#include <cmath>

using std::isfinite;
struct Dim { unsigned x = 0; };
static Dim blockIdx, blockDim, threadIdx;
static unsigned atomicCAS(unsigned *a, unsigned compare, unsigned value) {
    unsigned old = *a;
    if (old == compare) *a = value;
    return old;
}
#define __global__

#include KERNEL_SOURCE

// one launch: a grid of n one-thread blocks
#define LAUNCH(n, call)                                              \
    blockDim.x = 1;                                                  \
    threadIdx.x = 0;                                                 \
    for (long long i_ = 0; i_ < (n); ++i_) {                         \
        blockIdx.x = static_cast<unsigned>(i_);                      \
        call;                                                        \
    }

extern "C" void host_unclip_step(const float *pred, float *latents, const float *noise, float *sample_out, long long n,
                                 long long plane, int channels, int pred_channels, int cfg, float scale, float a,
                                 float b, float clip, float c_x0, float c_x, int learned, float std_, double min_log,
                                 double max_log, unsigned *bad_step, unsigned step) {
    LAUNCH(n, unclip_step(pred, latents, noise, sample_out, n, plane, channels, pred_channels, cfg, scale, a, b, clip,
                          c_x0, c_x, learned, std_, min_log, max_log, bad_step, step))
}

extern "C" void host_guided_step(const float *pred, float *latents, const float *noise, float *sample_out, long long n,
                                 int cfg, float scale, float a, float b, float clip, float c_x0, float c_x, float c_eps,
                                 float stdv, unsigned *bad_step, unsigned step) {
    LAUNCH(n, guided_step(pred, latents, noise, sample_out, n, cfg, scale, a, b, clip, c_x0, c_x, c_eps, stdv, bad_step,
                          step))
}
