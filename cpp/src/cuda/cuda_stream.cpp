#include "cuda/cuda_stream.hpp"

#include <string>
#include <utility>

#include "core/common.hpp"

namespace eclipse::core {

GuidedStepKernel::GuidedStepKernel(std::shared_ptr<const CudaDriver> driver, CUcontext context, const Nvrtc &nvrtc,
                                   const CudaDevice &device)
    : driver_(std::move(driver)), context_(context) {
    compiled_ = nvrtc.compile(guided_step_source(), "guided_step", device.sm());
    ContextGuard guard(*driver_, context_);
    driver_->check(driver_->ModuleLoadData(&module_, compiled_.image.data()),
                   "cuModuleLoadData (" + compiled_.kind + " of guided_step for " + compiled_.arch + ")");
    for (auto [function, name] : {std::pair{&function_, "guided_step"}, std::pair{&unclip_function_, "unclip_step"}}) {
        const CUresult r = driver_->ModuleGetFunction(function, module_, name);
        if (r != CUDA_SUCCESS) {
            driver_->ModuleUnload(module_);
            module_ = nullptr;
            driver_->check(r, std::string("cuModuleGetFunction(") + name + ")");
        }
    }
}

GuidedStepKernel::~GuidedStepKernel() {
    if (!module_) return;
    ContextGuard guard(*driver_, context_, std::nothrow);
    if (guard.ok()) driver_->ModuleUnload(module_);
}

void launch_guided_step(const CudaDriver &driver, CUfunction function, CUstream stream, const GuidedStepArgs &a) {
    // the order and types of kernels/guided_step.cu's parameters
    CUdeviceptr pred = a.pred, latents = a.latents, noise = a.noise, sample_out = a.sample_out, bad_step = a.bad_step;
    long long n = a.n;
    int cfg = a.cfg;
    float scale = a.scale, ka = a.k.a, kb = a.k.b, clip = a.k.clip, c_x0 = a.k.c_x0, c_x = a.k.c_x, c_eps = a.k.c_eps,
          stdv = a.k.std;
    unsigned int step = a.step;
    void *params[] = {&pred, &latents, &noise, &sample_out, &n, &cfg, &scale, &ka, &kb, &clip,
                      &c_x0, &c_x, &c_eps, &stdv, &bad_step, &step};
    const auto blocks = static_cast<unsigned>((a.n + kGuidedStepThreads - 1) / kGuidedStepThreads);
    driver.check(driver.LaunchKernel(function, blocks, 1, 1, kGuidedStepThreads, 1, 1, 0, stream, params, nullptr),
                 "cuLaunchKernel(guided_step)");
}

void launch_unclip_step(const CudaDriver &driver, CUfunction function, CUstream stream, const UnclipStepArgs &a) {
    // the order and types of kernels/guided_step.cu unclip_step's parameters
    CUdeviceptr pred = a.pred, latents = a.latents, noise = a.noise, sample_out = a.sample_out, bad_step = a.bad_step;
    long long n = a.n, plane = a.plane;
    int channels = a.channels, pred_channels = a.pred_channels, cfg = a.cfg, learned = a.k.learned ? 1 : 0;
    float scale = a.scale, ka = a.k.a, kb = a.k.b, clip = a.k.clip, c_x0 = a.k.c_x0, c_x = a.k.c_x, stdv = a.k.std_dev;
    double min_log = a.k.min_log, max_log = a.k.max_log;
    unsigned int step = a.step;
    void *params[] = {&pred, &latents, &noise, &sample_out, &n, &plane, &channels, &pred_channels, &cfg, &scale, &ka,
                      &kb, &clip, &c_x0, &c_x, &learned, &stdv, &min_log, &max_log, &bad_step, &step};
    const auto blocks = static_cast<unsigned>((a.n + kGuidedStepThreads - 1) / kGuidedStepThreads);
    driver.check(driver.LaunchKernel(function, blocks, 1, 1, kGuidedStepThreads, 1, 1, 0, stream, params, nullptr),
                 "cuLaunchKernel(unclip_step)");
}

CudaStream::CudaStream(std::shared_ptr<const CudaDriver> driver, CUcontext context, std::shared_ptr<const GuidedStepKernel> kernel)
    : driver_(std::move(driver)), context_(context), kernel_(std::move(kernel)) {
    ContextGuard guard(*driver_, context_);
    driver_->check(driver_->StreamCreate(&stream_, CU_STREAM_NON_BLOCKING), "cuStreamCreate");
}

std::unique_ptr<CudaStream> CudaStream::adopt(std::shared_ptr<const CudaDriver> driver, CUcontext context,
                                              std::shared_ptr<const GuidedStepKernel> kernel, CUstream stream) {
    std::unique_ptr<CudaStream> s(new CudaStream());
    s->driver_ = std::move(driver), s->context_ = context, s->kernel_ = std::move(kernel), s->stream_ = stream;
    return s;
}

CudaStream::~CudaStream() {
    if (!stream_) return;
    ContextGuard guard(*driver_, context_, std::nothrow);
    if (!guard.ok()) return;
    driver_->StreamSynchronize(stream_);
    driver_->StreamDestroy(stream_);
}

DevicePtr CudaStream::malloc(size_t bytes) {
    CUdeviceptr p = 0;
    const CUresult r = driver_->MemAlloc(&p, bytes);
    if (r == CUDA_ERROR_OUT_OF_MEMORY)
        throw Error(ECLIPSE_ERR_OUT_OF_MEMORY, "out of device memory allocating " + std::to_string(bytes) +
                                                   " bytes; try low-memory mode (--low-memory) or smaller images");
    driver_->check(r, "cuMemAlloc(" + std::to_string(bytes) + ")");
    return p;
}

void CudaStream::free(DevicePtr p) noexcept {
    if (p) driver_->MemFree(p);
}

void CudaStream::upload(DevicePtr dst, const void *src, size_t bytes) {
    driver_->check(driver_->MemcpyHtoDAsync(dst, src, bytes, stream_), "cuMemcpyHtoDAsync");
}

void CudaStream::download(void *dst, DevicePtr src, size_t bytes) {
    driver_->check(driver_->MemcpyDtoHAsync(dst, src, bytes, stream_), "cuMemcpyDtoHAsync");
}

void CudaStream::copy(DevicePtr dst, DevicePtr src, size_t bytes) {
    driver_->check(driver_->MemcpyDtoDAsync(dst, src, bytes, stream_), "cuMemcpyDtoDAsync");
}

void CudaStream::fill_u32(DevicePtr dst, uint32_t value, size_t count) {
    driver_->check(driver_->MemsetD32Async(dst, value, count, stream_), "cuMemsetD32Async");
}

void CudaStream::synchronize() { driver_->check(driver_->StreamSynchronize(stream_), "cuStreamSynchronize"); }

void CudaStream::begin_capture() {
    // thread-local mode: other threads' CUDA calls (a UI, a second generation) do not break it
    driver_->check(driver_->StreamBeginCapture(stream_, CU_STREAM_CAPTURE_MODE_THREAD_LOCAL), "cuStreamBeginCapture");
}

void *CudaStream::end_capture() {
    CUgraph graph = nullptr;
    driver_->check(driver_->StreamEndCapture(stream_, &graph), "cuStreamEndCapture");
    CUgraphExec exec = nullptr;
    const CUresult r = driver_->GraphInstantiateWithFlags(&exec, graph, 0);
    driver_->GraphDestroy(graph);
    driver_->check(r, "cuGraphInstantiate");
    return exec;
}

void CudaStream::launch_graph(void *graph) {
    driver_->check(driver_->GraphLaunch(static_cast<CUgraphExec>(graph), stream_), "cuGraphLaunch");
}

void CudaStream::destroy_graph(void *graph) noexcept {
    if (graph) driver_->GraphExecDestroy(static_cast<CUgraphExec>(graph));
}

void *CudaStream::create_event() {
    CUevent e = nullptr;
    driver_->check(driver_->EventCreate(&e, CU_EVENT_DISABLE_TIMING), "cuEventCreate");
    return e;
}

void CudaStream::record_event(void *event) {
    driver_->check(driver_->EventRecord(static_cast<CUevent>(event), stream_), "cuEventRecord");
}

void CudaStream::wait_event(void *event) {
    driver_->check(driver_->EventSynchronize(static_cast<CUevent>(event)), "cuEventSynchronize");
}

void CudaStream::destroy_event(void *event) noexcept {
    if (event) driver_->EventDestroy(static_cast<CUevent>(event));
}

void CudaStream::guided_step(const GuidedStepArgs &args) {
    if (!kernel_) throw Error(ECLIPSE_ERR_INTERNAL, "guided_step launched on a stream without the kernel");
    launch_guided_step(*driver_, kernel_->function(), stream_, args);
}

}  // namespace eclipse::core

namespace eclipse::core {

void CudaStream::unclip_step(const UnclipStepArgs &args) {
    if (!kernel_) throw Error(ECLIPSE_ERR_INTERNAL, "unclip_step launched on a stream without the kernel");
    launch_unclip_step(*driver_, kernel_->unclip_function(), stream_, args);
}

}  // namespace eclipse::core
