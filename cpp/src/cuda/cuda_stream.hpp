// The real DeviceStream: one non-blocking CUDA stream on the device's primary context (TensorRT's
// enqueue must not use the legacy default stream), and the fused guidance + step kernel loaded
// from the cubin NVRTC compiled for this GPU.
#pragma once

#include <memory>

#include "cuda/cuda_driver.hpp"
#include "backends/device_loop.hpp"
#include "cuda/nvrtc.hpp"

namespace eclipse::core {

// guided_step compiled for one GPU and loaded into its primary context; shared by every stream.
class GuidedStepKernel {
public:
    GuidedStepKernel(std::shared_ptr<const CudaDriver> driver, CUcontext context, const Nvrtc &nvrtc, const CudaDevice &device);
    ~GuidedStepKernel();
    GuidedStepKernel(const GuidedStepKernel &) = delete;
    GuidedStepKernel &operator=(const GuidedStepKernel &) = delete;
    CUfunction function() const { return function_; }
    CUfunction unclip_function() const { return unclip_function_; }  // the same source's Karlo step
    const CompiledKernel &compiled() const { return compiled_; }

private:
    std::shared_ptr<const CudaDriver> driver_;
    CUcontext context_;
    CompiledKernel compiled_;
    CUmodule module_ = nullptr;
    CUfunction function_ = nullptr, unclip_function_ = nullptr;
};

// Launches guided_step (the order and types of kernels/guided_step.cu's parameters).
void launch_guided_step(const CudaDriver &driver, CUfunction function, CUstream stream, const GuidedStepArgs &args);
// Launches unclip_step (its parameters' order and types in the same file).
void launch_unclip_step(const CudaDriver &driver, CUfunction function, CUstream stream, const UnclipStepArgs &args);

// Its constructor and destructor push the context themselves; every other method expects the
// caller to hold a ContextGuard of that context (the backend's entries do).
class CudaStream final : public DeviceStream {
public:
    // kernel may be null for streams that never run the UNet loop
    CudaStream(std::shared_ptr<const CudaDriver> driver, CUcontext context, std::shared_ptr<const GuidedStepKernel> kernel);
    // For eclipse-cuda-check: wraps a stream handle made elsewhere (or none), so that every
    // method's driver call can be made against a driver without a device.
    static std::unique_ptr<CudaStream> adopt(std::shared_ptr<const CudaDriver> driver, CUcontext context,
                                             std::shared_ptr<const GuidedStepKernel> kernel, CUstream stream);
    ~CudaStream() override;
    CUstream get() const { return stream_; }

    DevicePtr malloc(size_t bytes) override;
    void free(DevicePtr p) noexcept override;
    void upload(DevicePtr dst, const void *src, size_t bytes) override;
    void download(void *dst, DevicePtr src, size_t bytes) override;
    void copy(DevicePtr dst, DevicePtr src, size_t bytes) override;
    void fill_u32(DevicePtr dst, uint32_t value, size_t count) override;
    void synchronize() override;
    void begin_capture() override;
    void *end_capture() override;
    void launch_graph(void *graph) override;
    void destroy_graph(void *graph) noexcept override;
    void *create_event() override;
    void record_event(void *event) override;
    void wait_event(void *event) override;
    void destroy_event(void *event) noexcept override;
    void guided_step(const GuidedStepArgs &args) override;
    void unclip_step(const UnclipStepArgs &args) override;

private:
    CudaStream() = default;
    std::shared_ptr<const CudaDriver> driver_;
    CUcontext context_ = nullptr;
    std::shared_ptr<const GuidedStepKernel> kernel_;
    CUstream stream_ = nullptr;
};

}  // namespace eclipse::core
