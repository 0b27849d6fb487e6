#include "cuda/cuda_driver.hpp"

#include <dlfcn.h>

#include <map>
#include <mutex>

#include "core/common.hpp"

// member, symbol name as cuGetProcAddress knows it (base name, no _v2 / _ptsz suffix)
#define ECLIPSE_CUDA_ENTRY_POINTS(X)                                                                   \
    X(Init, cuInit) X(DriverGetVersion, cuDriverGetVersion) X(GetErrorName, cuGetErrorName)             \
    X(DeviceGetCount, cuDeviceGetCount) X(DeviceGet, cuDeviceGet) X(DeviceGetName, cuDeviceGetName)     \
    X(DeviceGetAttribute, cuDeviceGetAttribute) X(DeviceTotalMem, cuDeviceTotalMem)                     \
    X(DevicePrimaryCtxRetain, cuDevicePrimaryCtxRetain) X(DevicePrimaryCtxRelease, cuDevicePrimaryCtxRelease) \
    X(CtxPushCurrent, cuCtxPushCurrent) X(CtxPopCurrent, cuCtxPopCurrent) X(MemAlloc, cuMemAlloc)         \
    X(MemFree, cuMemFree) X(MemcpyHtoDAsync, cuMemcpyHtoDAsync) X(MemcpyDtoHAsync, cuMemcpyDtoHAsync)   \
    X(MemcpyDtoDAsync, cuMemcpyDtoDAsync) X(MemsetD32Async, cuMemsetD32Async)                           \
    X(StreamCreate, cuStreamCreate) X(StreamDestroy, cuStreamDestroy)                                   \
    X(StreamSynchronize, cuStreamSynchronize) X(StreamBeginCapture, cuStreamBeginCapture)               \
    X(StreamEndCapture, cuStreamEndCapture) X(GraphInstantiateWithFlags, cuGraphInstantiateWithFlags)   \
    X(GraphDestroy, cuGraphDestroy) X(GraphLaunch, cuGraphLaunch) X(GraphExecDestroy, cuGraphExecDestroy) \
    X(EventCreate, cuEventCreate) X(EventRecord, cuEventRecord) X(EventSynchronize, cuEventSynchronize) \
    X(EventDestroy, cuEventDestroy) X(ModuleLoadData, cuModuleLoadData) X(ModuleUnload, cuModuleUnload) \
    X(ModuleGetFunction, cuModuleGetFunction) X(LaunchKernel, cuLaunchKernel)

namespace eclipse::core {
namespace {

// CUDA 12.0 added cuGetProcAddress with a status argument (exported as cuGetProcAddress_v2);
// every driver the project supports (JetPack 6: CUDA 12.2+, x86: 12.x/13.x) has it.
using GetProcAddress = CUresult (*)(const char *, void **, int, cuuint64_t, CUdriverProcAddressQueryResult *);

}  // namespace

const std::vector<std::string> &CudaDriver::entry_points() {
#define ECLIPSE_NAME(member, symbol) #symbol,
    static const std::vector<std::string> names{ECLIPSE_CUDA_ENTRY_POINTS(ECLIPSE_NAME)};
#undef ECLIPSE_NAME
    return names;
}

std::shared_ptr<const CudaDriver> CudaDriver::open(const std::string &given) {
    // One CudaDriver per library path and process: the driver is never unloaded.
    static std::mutex mutex;
    static std::map<std::string, std::shared_ptr<const CudaDriver>> opened;
    const std::string path = given.empty() ? "libcuda.so.1" : given;
    std::lock_guard<std::mutex> lock(mutex);
    if (auto it = opened.find(path); it != opened.end()) return it->second;
    void *handle = dlopen(path.c_str(), RTLD_NOW | RTLD_LOCAL);
    if (!handle)
        backend_error("no NVIDIA driver here (cannot load " + path + ": " + dlerror() +
                      "); the TensorRT backends need an NVIDIA GPU and its driver");
    auto get_proc = reinterpret_cast<GetProcAddress>(dlsym(handle, "cuGetProcAddress_v2"));
    if (!get_proc) backend_error(path + " is older than CUDA 12 (no cuGetProcAddress_v2): update the NVIDIA driver");
    std::shared_ptr<CudaDriver> d(new CudaDriver());
    d->path_ = path;
    std::string missing;
    auto resolve = [&](void **slot, const char *symbol) {
        CUdriverProcAddressQueryResult found = CU_GET_PROC_ADDRESS_SYMBOL_NOT_FOUND;
        if (get_proc(symbol, slot, CUDA_VERSION, CU_GET_PROC_ADDRESS_DEFAULT, &found) != CUDA_SUCCESS ||
            found != CU_GET_PROC_ADDRESS_SUCCESS || *slot == nullptr) {
            *slot = nullptr;
            missing += std::string(missing.empty() ? "" : ", ") + symbol;
        }
    };
#define ECLIPSE_RESOLVE(member, symbol) resolve(reinterpret_cast<void **>(&d->member), #symbol);
    ECLIPSE_CUDA_ENTRY_POINTS(ECLIPSE_RESOLVE)
#undef ECLIPSE_RESOLVE
    if (!missing.empty()) backend_error("the NVIDIA driver (" + path + ") lacks " + missing + ": update the driver");
    return opened[path] = d;
}

std::string CudaDriver::error_name(CUresult r) const {
    const char *name = nullptr;
    if (GetErrorName(r, &name) != CUDA_SUCCESS || name == nullptr) return "CUresult " + std::to_string(static_cast<int>(r));
    return name;
}

void CudaDriver::check(CUresult r, const std::string &what) const {
    if (r != CUDA_SUCCESS) backend_error("CUDA " + what + " failed: " + error_name(r));
}

int CudaDriver::driver_version() const {
    int v = 0;
    check(DriverGetVersion(&v), "cuDriverGetVersion");
    return v;
}

CudaDevice CudaDriver::device(int index) const {
    const CUresult init = Init(0);
    int count = 0;
    if (init == CUDA_SUCCESS) check(DeviceGetCount(&count), "cuDeviceGetCount");
    if (init != CUDA_SUCCESS || count == 0)
        backend_error("no usable CUDA GPU here (" + (init != CUDA_SUCCESS ? error_name(init) : std::string("no device")) +
                      "); the TensorRT backends need an NVIDIA GPU and driver (use the onnxruntime backend on CPU)");
    if (index < 0 || index >= count)
        throw Error(ECLIPSE_ERR_INVALID_ARGUMENT,
                    "CUDA device " + std::to_string(index) + " does not exist (this machine has " + std::to_string(count) + ")");
    CUdevice dev = 0;
    check(DeviceGet(&dev, index), "cuDeviceGet");
    CudaDevice info;
    info.index = index;
    char name[256] = {};
    check(DeviceGetName(name, sizeof name - 1, dev), "cuDeviceGetName");
    info.name = name;
    check(DeviceGetAttribute(&info.major, CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR, dev), "cuDeviceGetAttribute");
    check(DeviceGetAttribute(&info.minor, CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR, dev), "cuDeviceGetAttribute");
    check(DeviceTotalMem(&info.total_bytes, dev), "cuDeviceTotalMem");
    return info;
}

CUcontext CudaDriver::retain_primary_context(int index) const {
    CUdevice dev = 0;
    check(DeviceGet(&dev, index), "cuDeviceGet");
    CUcontext ctx = nullptr;
    check(DevicePrimaryCtxRetain(&ctx, dev), "cuDevicePrimaryCtxRetain");
    return ctx;
}

void CudaDriver::release_primary_context(int index) const {
    CUdevice dev = 0;
    if (DeviceGet(&dev, index) == CUDA_SUCCESS) DevicePrimaryCtxRelease(dev);
}

}  // namespace eclipse::core
