// The little of the CUDA driver API the TensorRT backend needs, with libcuda opened at run time.
//
// Why the driver API, opened with dlopen, and no CUDA runtime (cudart): libeclipse must load on
// machines without an NVIDIA driver (the core, ONNX Runtime and custom backends run there), the
// driver is always the system's own (never a copy linked at build time), and the driver API's
// ABI is stable across CUDA 12 (JetPack 6) and 13. Every entry point is resolved through
// cuGetProcAddress for the CUDA version of the cuda.h compiled against, so each function pointer
// has exactly the signature this file was compiled with (a newer driver keeps serving it; an
// older one gives its newest version of the symbol, the same ABI for every function used here).
// TensorRT uses the runtime API internally, on the device's primary context: every entry into the
// backend pushes that context and pops it on the way out (ContextGuard), so the calling thread's
// own context is current again when the library returns: an embedding application's later CUDA
// calls never land in ours.
#pragma once

#include <cuda.h>

#include <cstdint>
#include <memory>
#include <new>
#include <string>
#include <vector>

namespace eclipse::core {

struct CudaDevice {
    int index = 0;
    std::string name;
    int major = 0, minor = 0;   // compute capability
    size_t total_bytes = 0;
    std::string compute_capability() const { return "SM" + std::to_string(major) + std::to_string(minor); }
    int sm() const { return major * 10 + minor; }
};

class CudaDriver {
public:
    // Opens libcuda (path "" : libcuda.so.1) and resolves every entry point; throws
    // Error(ECLIPSE_ERR_BACKEND) when the library or cuGetProcAddress is missing.
    static std::shared_ptr<const CudaDriver> open(const std::string &path = "");

    // CUDA version the driver supports (12060 for 12.6), read before cuInit: needs no GPU.
    int driver_version() const;
    // cuInit + the device: throws Error(ECLIPSE_ERR_BACKEND) naming the driver's answer
    // ("CUDA_ERROR_NO_DEVICE") when there is no usable GPU.
    CudaDevice device(int index) const;
    // Retains the primary context of `device` (the one TensorRT's runtime API calls use); it is
    // made current only inside a ContextGuard.
    CUcontext retain_primary_context(int index) const;
    void release_primary_context(int index) const;

    // Throws Error(ECLIPSE_ERR_BACKEND) "CUDA <what> failed: <CUDA_ERROR_NAME>" unless r is CUDA_SUCCESS.
    void check(CUresult r, const std::string &what) const;
    std::string error_name(CUresult r) const;
    const std::string &path() const { return path_; }

    // The entry points, named as in cuda.h (without version suffixes).
    decltype(&::cuInit) Init = nullptr;
    decltype(&::cuDriverGetVersion) DriverGetVersion = nullptr;
    decltype(&::cuGetErrorName) GetErrorName = nullptr;
    decltype(&::cuDeviceGetCount) DeviceGetCount = nullptr;
    decltype(&::cuDeviceGet) DeviceGet = nullptr;
    decltype(&::cuDeviceGetName) DeviceGetName = nullptr;
    decltype(&::cuDeviceGetAttribute) DeviceGetAttribute = nullptr;
    decltype(&::cuDeviceTotalMem) DeviceTotalMem = nullptr;
    decltype(&::cuDevicePrimaryCtxRetain) DevicePrimaryCtxRetain = nullptr;
    decltype(&::cuDevicePrimaryCtxRelease) DevicePrimaryCtxRelease = nullptr;
    decltype(&::cuCtxPushCurrent) CtxPushCurrent = nullptr;
    decltype(&::cuCtxPopCurrent) CtxPopCurrent = nullptr;
    decltype(&::cuMemAlloc) MemAlloc = nullptr;
    decltype(&::cuMemFree) MemFree = nullptr;
    decltype(&::cuMemcpyHtoDAsync) MemcpyHtoDAsync = nullptr;
    decltype(&::cuMemcpyDtoHAsync) MemcpyDtoHAsync = nullptr;
    decltype(&::cuMemcpyDtoDAsync) MemcpyDtoDAsync = nullptr;
    decltype(&::cuMemsetD32Async) MemsetD32Async = nullptr;
    decltype(&::cuStreamCreate) StreamCreate = nullptr;
    decltype(&::cuStreamDestroy) StreamDestroy = nullptr;
    decltype(&::cuStreamSynchronize) StreamSynchronize = nullptr;
    decltype(&::cuStreamBeginCapture) StreamBeginCapture = nullptr;
    decltype(&::cuStreamEndCapture) StreamEndCapture = nullptr;
    decltype(&::cuGraphInstantiateWithFlags) GraphInstantiateWithFlags = nullptr;
    decltype(&::cuGraphDestroy) GraphDestroy = nullptr;
    decltype(&::cuGraphLaunch) GraphLaunch = nullptr;
    decltype(&::cuGraphExecDestroy) GraphExecDestroy = nullptr;
    decltype(&::cuEventCreate) EventCreate = nullptr;
    decltype(&::cuEventRecord) EventRecord = nullptr;
    decltype(&::cuEventSynchronize) EventSynchronize = nullptr;
    decltype(&::cuEventDestroy) EventDestroy = nullptr;
    decltype(&::cuModuleLoadData) ModuleLoadData = nullptr;
    decltype(&::cuModuleUnload) ModuleUnload = nullptr;
    decltype(&::cuModuleGetFunction) ModuleGetFunction = nullptr;
    decltype(&::cuLaunchKernel) LaunchKernel = nullptr;

    // Names of the entry points resolved above, in order (the API check lists them).
    static const std::vector<std::string> &entry_points();

private:
    CudaDriver() = default;
    std::string path_;
};

// `context` current on this thread for the guard's life, the caller's own context current again
// after it (cuCtxPushCurrent / cuCtxPopCurrent; guards nest). The throwing form is for entries;
// destructors use the nothrow form and skip their CUDA calls when ok() is false.
class ContextGuard {
public:
    ContextGuard(const CudaDriver &driver, CUcontext context) : driver_(driver) {
        driver_.check(driver_.CtxPushCurrent(context), "cuCtxPushCurrent");
        pushed_ = true;
    }
    ContextGuard(const CudaDriver &driver, CUcontext context, std::nothrow_t) noexcept : driver_(driver) {
        pushed_ = driver_.CtxPushCurrent(context) == CUDA_SUCCESS;
    }
    ~ContextGuard() {
        CUcontext popped = nullptr;
        if (pushed_) driver_.CtxPopCurrent(&popped);
    }
    ContextGuard(const ContextGuard &) = delete;
    ContextGuard &operator=(const ContextGuard &) = delete;
    bool ok() const { return pushed_; }

private:
    const CudaDriver &driver_;
    bool pushed_ = false;
};

}  // namespace eclipse::core
