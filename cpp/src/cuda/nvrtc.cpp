#include "cuda/nvrtc.hpp"

#include <dlfcn.h>

#include <algorithm>
#include <map>
#include <mutex>

#include "core/common.hpp"

namespace eclipse::core {
namespace {

// float32 throughout and no fused multiply-adds: the same arithmetic as schedulers.apply_step and
// guidance.combine, which CI checks against diffusers (the Python runtime's NVRTC_OPTIONS).
constexpr const char *kOptions[] = {"--fmad=false"};

std::string join(const std::vector<int> &v) {
    std::string s;
    for (int x : v) s += (s.empty() ? "" : ", ") + std::to_string(x);
    return s;
}

}  // namespace

std::pair<std::string, std::string> nvrtc_architecture(const std::vector<int> &supported, int sm) {
    if (std::find(supported.begin(), supported.end(), sm) != supported.end()) return {"cubin", "sm_" + std::to_string(sm)};
    int best = -1;
    for (int a : supported) {
        if (a <= sm) best = std::max(best, a);
    }
    if (best < 0)
        backend_error("this NVRTC cannot compile for SM" + std::to_string(sm) + " (it knows " + join(supported) +
                      "); install the NVRTC of your CUDA major (JetPack 6: the CUDA 12 toolkit's libnvrtc.so.12; "
                      "pip: nvidia-cuda-nvrtc-cu12 or nvidia-cuda-nvrtc)");
    return {"ptx", "compute_" + std::to_string(best)};
}

std::shared_ptr<const Nvrtc> Nvrtc::open(const std::string &given, int cuda_major) {
    static std::mutex mutex;
    static std::map<std::string, std::shared_ptr<const Nvrtc>> opened;
    std::vector<std::string> candidates;
    if (!given.empty()) candidates.push_back(given);
    else {
        for (int major = cuda_major; major >= 12; --major) candidates.push_back("libnvrtc.so." + std::to_string(major));
    }
    std::lock_guard<std::mutex> lock(mutex);
    std::string errors;
    for (const auto &path : candidates) {
        if (auto it = opened.find(path); it != opened.end()) return it->second;
        void *handle = dlopen(path.c_str(), RTLD_NOW | RTLD_LOCAL);
        if (!handle) {
            errors += std::string(errors.empty() ? "" : "; ") + dlerror();
            continue;
        }
        std::shared_ptr<Nvrtc> n(new Nvrtc());
        n->path_ = path;
        std::string missing;
        auto resolve = [&](void **slot, const char *symbol) {
            *slot = dlsym(handle, symbol);
            if (!*slot) missing += std::string(missing.empty() ? "" : ", ") + symbol;
        };
#define ECLIPSE_RESOLVE(member) resolve(reinterpret_cast<void **>(&n->member), "nvrtc" #member);
        ECLIPSE_RESOLVE(GetErrorString) ECLIPSE_RESOLVE(Version) ECLIPSE_RESOLVE(GetNumSupportedArchs)
        ECLIPSE_RESOLVE(GetSupportedArchs) ECLIPSE_RESOLVE(CreateProgram) ECLIPSE_RESOLVE(DestroyProgram)
        ECLIPSE_RESOLVE(CompileProgram) ECLIPSE_RESOLVE(GetProgramLogSize) ECLIPSE_RESOLVE(GetProgramLog)
        ECLIPSE_RESOLVE(GetCUBINSize) ECLIPSE_RESOLVE(GetCUBIN) ECLIPSE_RESOLVE(GetPTXSize) ECLIPSE_RESOLVE(GetPTX)
#undef ECLIPSE_RESOLVE
        if (!missing.empty()) backend_error(path + " is not a usable NVRTC (it lacks " + missing + ")");
        return opened[path] = n;
    }
    backend_error("NVRTC cannot be loaded (" + errors + "); the TensorRT backend compiles its guidance + step kernel "
                  "with it: install the CUDA " + std::to_string(cuda_major) + " NVRTC (JetPack 6: the CUDA toolkit's "
                  "libnvrtc; pip: nvidia-cuda-nvrtc-cu12 or nvidia-cuda-nvrtc) or name it in nvrtc_library_path");
}

void Nvrtc::check(nvrtcResult r, const std::string &what) const {
    if (r != NVRTC_SUCCESS) backend_error("NVRTC " + what + " failed: " + GetErrorString(r));
}

std::pair<int, int> Nvrtc::version() const {
    int major = 0, minor = 0;
    check(Version(&major, &minor), "nvrtcVersion");
    return {major, minor};
}

std::vector<int> Nvrtc::supported_archs() const {
    int n = 0;
    check(GetNumSupportedArchs(&n), "nvrtcGetNumSupportedArchs");
    std::vector<int> archs(static_cast<size_t>(std::max(n, 0)));
    if (n > 0) check(GetSupportedArchs(archs.data()), "nvrtcGetSupportedArchs");
    return archs;
}

CompiledKernel Nvrtc::compile(const std::string &source, const std::string &name, int sm) const {
    CompiledKernel out;
    std::tie(out.kind, out.arch) = nvrtc_architecture(supported_archs(), sm);
    nvrtcProgram prog = nullptr;
    check(CreateProgram(&prog, source.c_str(), (name + ".cu").c_str(), 0, nullptr, nullptr), "nvrtcCreateProgram");
    struct Destroy {  // whatever happens below
        const Nvrtc *n;
        nvrtcProgram *p;
        ~Destroy() { n->DestroyProgram(p); }
    } destroy{this, &prog};
    const std::string arch = "--gpu-architecture=" + out.arch;
    std::vector<const char *> options{arch.c_str()};
    options.insert(options.end(), std::begin(kOptions), std::end(kOptions));
    const nvrtcResult compiled = CompileProgram(prog, static_cast<int>(options.size()), options.data());
    if (compiled != NVRTC_SUCCESS) {
        size_t size = 0;
        std::string log;
        if (GetProgramLogSize(prog, &size) == NVRTC_SUCCESS && size > 1) {
            log.resize(size);
            if (GetProgramLog(prog, log.data()) != NVRTC_SUCCESS) log.clear();
            while (!log.empty() && (log.back() == '\0' || log.back() == '\n' || log.back() == ' ')) log.pop_back();
        }
        backend_error("NVRTC could not compile " + name + " for " + out.arch + ": " +
                      (log.empty() ? std::string(GetErrorString(compiled)) : log));
    }
    size_t size = 0;
    const bool cubin = out.kind == "cubin";
    check(cubin ? GetCUBINSize(prog, &size) : GetPTXSize(prog, &size), cubin ? "nvrtcGetCUBINSize" : "nvrtcGetPTXSize");
    out.image.resize(size);
    check(cubin ? GetCUBIN(prog, out.image.data()) : GetPTX(prog, out.image.data()), cubin ? "nvrtcGetCUBIN" : "nvrtcGetPTX");
    return out;
}

}  // namespace eclipse::core
