// NVRTC, opened at run time: compiles the fused guidance + scheduler step kernel
// (eclipse_export/runtime/backends/kernels/guided_step.cu, embedded at build time) for the GPU it runs on,
// with the Python runtime's rules (eclipse_export/runtime/backends/cuda.py: compile_kernel):
//  - a cubin for the GPU's own sm_XX whenever this NVRTC knows it: PTX carries its NVRTC's PTX
//    version and a driver older than that NVRTC refuses it (pip's NVRTC 13.5 writes PTX 9.5, the
//    CUDA 12.6 driver of JetPack 6 reads up to 8.5); a cubin needs only the same CUDA major;
//  - PTX for the newest architecture it knows below the GPU only for a GPU newer than the NVRTC
//    (the driver, newer then, JIT-compiles it);
//  - --fmad=false: float32 operation by operation, as the numpy statement of the step;
//  - the program is destroyed after every compile, failed or not.
#pragma once

#include <nvrtc.h>

#include <memory>
#include <string>
#include <utility>
#include <vector>

namespace eclipse::core {

struct CompiledKernel {
    std::string kind;  // "cubin" or "ptx"
    std::string arch;  // the --gpu-architecture value, "sm_87" or "compute_90"
    std::string image; // what cuModuleLoadData takes (PTX ends with its NUL)
};

// (kind, --gpu-architecture value) for a GPU of compute capability `sm` (87 for SM 8.7) with an
// NVRTC that supports `supported`; throws Error(ECLIPSE_ERR_BACKEND) when it knows nothing <= sm.
std::pair<std::string, std::string> nvrtc_architecture(const std::vector<int> &supported, int sm);

class Nvrtc {
public:
    // `path` "": libnvrtc.so.<cuda_major>, then the older majors down to 12 (a cubin from an
    // NVRTC older than the driver loads; one from a newer major does not).
    static std::shared_ptr<const Nvrtc> open(const std::string &path, int cuda_major);

    std::pair<int, int> version() const;
    std::vector<int> supported_archs() const;
    CompiledKernel compile(const std::string &source, const std::string &name, int sm) const;
    const std::string &path() const { return path_; }

    // The entry points (names as in nvrtc.h).
    decltype(&::nvrtcGetErrorString) GetErrorString = nullptr;
    decltype(&::nvrtcVersion) Version = nullptr;
    decltype(&::nvrtcGetNumSupportedArchs) GetNumSupportedArchs = nullptr;
    decltype(&::nvrtcGetSupportedArchs) GetSupportedArchs = nullptr;
    decltype(&::nvrtcCreateProgram) CreateProgram = nullptr;
    decltype(&::nvrtcDestroyProgram) DestroyProgram = nullptr;
    decltype(&::nvrtcCompileProgram) CompileProgram = nullptr;
    decltype(&::nvrtcGetProgramLogSize) GetProgramLogSize = nullptr;
    decltype(&::nvrtcGetProgramLog) GetProgramLog = nullptr;
    decltype(&::nvrtcGetCUBINSize) GetCUBINSize = nullptr;
    decltype(&::nvrtcGetCUBIN) GetCUBIN = nullptr;
    decltype(&::nvrtcGetPTXSize) GetPTXSize = nullptr;
    decltype(&::nvrtcGetPTX) GetPTX = nullptr;

private:
    Nvrtc() = default;
    void check(nvrtcResult r, const std::string &what) const;
    std::string path_;
};

// The source of eclipse_export/runtime/backends/kernels/guided_step.cu, embedded at build time (CMake
// file(READ) into a generated source: the repository holds one copy of the kernel).
const std::string &guided_step_source();

// Threads per block of every guided_step launch (the kernel indexes blockIdx.x * blockDim.x).
constexpr unsigned kGuidedStepThreads = 256;

}  // namespace eclipse::core
