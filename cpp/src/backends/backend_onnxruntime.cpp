// ONNX Runtime through its C API (CPU and CUDA execution providers). Built only with
// -DECLIPSE_WITH_ONNXRUNTIME=ON and ONNX Runtime's headers; otherwise creating it says so.
// libonnxruntime is opened when the backend is created (dlopen), not linked: the library and
// the apps using other backends run where ONNX Runtime is not installed, and one build works
// with any ONNX Runtime at least as new as its headers (the onnxruntime wheel's library, whose
// file name differs from its soname, included).
#include "core/backend.hpp"

#ifdef ECLIPSE_WITH_ONNXRUNTIME

#include <dlfcn.h>
#include <onnxruntime_c_api.h>

#include <algorithm>
#include <map>
#include <mutex>
#include <sstream>

#ifndef ECLIPSE_ORT_DEFAULT_LIBRARY
#define ECLIPSE_ORT_DEFAULT_LIBRARY "libonnxruntime.so.1"
#endif

namespace eclipse::core {
namespace {

const OrtApi *g_api = nullptr;  // the one ONNX Runtime of this process, set by load_api

// The OrtApi of the library at `path`, opened once per process and never closed (ONNX Runtime
// does not support being unloaded).
const OrtApi *load_api(const std::string &path) {
    static std::mutex mutex;
    static std::map<std::string, const OrtApi *> apis;
    std::lock_guard<std::mutex> lock(mutex);
    if (auto it = apis.find(path); it != apis.end()) return it->second;
    void *handle = dlopen(path.c_str(), RTLD_NOW | RTLD_LOCAL);
    if (!handle) throw Error(ECLIPSE_ERR_BACKEND, "cannot load ONNX Runtime (" + path + "): " + dlerror());
    using GetApiBase = const OrtApiBase *(*)();
    auto get_base = reinterpret_cast<GetApiBase>(dlsym(handle, "OrtGetApiBase"));
    if (!get_base) throw Error(ECLIPSE_ERR_BACKEND, path + " is not ONNX Runtime (no OrtGetApiBase)");
    const OrtApi *api = get_base()->GetApi(ORT_API_VERSION);
    if (!api) {
        throw Error(ECLIPSE_ERR_BACKEND, "ONNX Runtime " + std::string(get_base()->GetVersionString()) + " at " + path +
                                             " is older than the headers this library was built with (API " +
                                             std::to_string(ORT_API_VERSION) + ")");
    }
    if (g_api && g_api != api) throw Error(ECLIPSE_ERR_BACKEND, "another ONNX Runtime library is already in use in this process");
    g_api = api;  // under the mutex: backends created on several threads agree on one library
    return apis[path] = api;
}

const OrtApi &ort() { return *g_api; }

void check(OrtStatus *status, const std::string &what) {
    if (!status) return;
    const std::string message = ort().GetErrorMessage(status);
    ort().ReleaseStatus(status);
    throw Error(ECLIPSE_ERR_BACKEND, "ONNX Runtime: " + what + ": " + message);
}

struct Released {  // releases an ORT object with its own release function
    template <class T>
    static std::shared_ptr<T> hold(T *p, void (*release)(T *)) {
        return std::shared_ptr<T>(p, [release](T *q) { if (q) release(q); });
    }
};

class OrtGraph final : public Session {
public:
    OrtGraph(std::shared_ptr<OrtEnv> env, std::shared_ptr<OrtSession> session, std::string component)
        : env_(std::move(env)), session_(std::move(session)), component_(std::move(component)) {
        OrtMemoryInfo *info = nullptr;
        check(ort().CreateCpuMemoryInfo(OrtArenaAllocator, OrtMemTypeDefault, &info), "memory info");
        memory_ = Released::hold(info, ort().ReleaseMemoryInfo);
    }

    // OrtApi::Run is thread-safe on one session; every call brings its own buffers
    void run(SessionState *, const std::vector<TensorView> &inputs, std::vector<TensorView> &outputs) const override {
        std::vector<OrtValue *> in, out;
        auto release_all = [&] {
            for (OrtValue *v : in) ort().ReleaseValue(v);
            for (OrtValue *v : out) if (v) ort().ReleaseValue(v);
        };
        try {
            auto wrap = [&](const TensorView &t) {
                OrtValue *v = nullptr;
                check(ort().CreateTensorWithDataAsOrtValue(
                          memory_.get(), t.data, t.bytes(), t.shape.data(), t.shape.size(),
                          t.dtype == DType::Float32 ? ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT : ONNX_TENSOR_ELEMENT_DATA_TYPE_INT32, &v),
                      component_ + "." + t.name);
                return v;
            };
            std::vector<const char *> in_names, out_names;
            for (const auto &t : inputs) in.push_back(wrap(t)), in_names.push_back(t.name.c_str());
            // outputs are pre-allocated: ONNX Runtime writes into the library's buffers
            for (auto &t : outputs) out.push_back(wrap(t)), out_names.push_back(t.name.c_str());
            check(ort().Run(session_.get(), nullptr, in_names.data(), in.data(), in.size(), out_names.data(), out_names.size(),
                            out.data()),
                  "running " + component_);
        } catch (...) {
            release_all();
            throw;
        }
        release_all();
    }

private:
    std::shared_ptr<OrtEnv> env_;  // outlives its sessions
    std::shared_ptr<OrtSession> session_;
    std::shared_ptr<OrtMemoryInfo> memory_;
    std::string component_;
};

class OnnxRuntimeBackend final : public Backend {
public:
    explicit OnnxRuntimeBackend(const eclipse_onnxruntime_options &o) : threads_(o.intra_op_threads), device_(o.device_id) {
        load_api(o.library_path ? o.library_path : ECLIPSE_ORT_DEFAULT_LIBRARY);
        OrtEnv *env = nullptr;
        check(ort().CreateEnv(ORT_LOGGING_LEVEL_ERROR, "eclipse", &env), "creating the environment");
        env_ = Released::hold(env, ort().ReleaseEnv);
        std::stringstream list(o.providers ? o.providers : "cpu");
        for (std::string p; std::getline(list, p, ',');) {
            if (p != "cpu" && p != "cuda") throw Error(ECLIPSE_ERR_INVALID_ARGUMENT, "unknown provider '" + p + "' (choose from cpu, cuda)");
            providers_.push_back(p);
        }
        char **available = nullptr;
        int count = 0;
        check(ort().GetAvailableProviders(&available, &count), "listing providers");
        std::vector<std::string> names(available, available + count);
        check(ort().ReleaseAvailableProviders(available, count), "listing providers");
        if (std::find(providers_.begin(), providers_.end(), "cuda") != providers_.end() &&
            std::find(names.begin(), names.end(), "CUDAExecutionProvider") == names.end()) {
            std::string have;
            for (const auto &n : names) have += (have.empty() ? "" : ", ") + n;
            throw Error(ECLIPSE_ERR_BACKEND, "ONNX Runtime here has no cuda provider (available: " + have +
                                                 "); use a GPU build of ONNX Runtime (onnxruntime-gpu)");
        }
        name_ = "onnxruntime-";
        for (size_t i = 0; i < providers_.size(); ++i) name_ += (i ? "+" : "") + providers_[i];
    }

    std::string name() const override { return name_; }

    std::unique_ptr<Session> load(const Bundle &, const ComponentFiles &c) const override {
        OrtSessionOptions *raw = nullptr;
        check(ort().CreateSessionOptions(&raw), "session options");
        auto options = Released::hold(raw, ort().ReleaseSessionOptions);
        check(ort().SetSessionLogSeverityLevel(options.get(), 3), "log level");
        if (threads_ > 0) check(ort().SetIntraOpNumThreads(options.get(), threads_), "threads");
        // The Python runtime's "tuned" CPU profile (runtime/backends/onnxruntime.py
        // _TUNED_CPU_CONFIG; measured in docs/decisions.md): worker threads sleep between parallel
        // sections instead of spinning, which on a loaded machine (or with the other session's
        // threads) gives the cores to the work instead of to busy-waiting
        for (const char *key : {"session.intra_op.allow_spinning", "session.inter_op.allow_spinning"})
            check(ort().AddSessionConfigEntry(options.get(), key, "0"), key);
        for (const auto &p : providers_) {  // in order of preference; CPU is always the fallback
            if (p != "cuda") continue;
            OrtCUDAProviderOptionsV2 *cuda = nullptr;
            check(ort().CreateCUDAProviderOptions(&cuda), "CUDA options");
            auto hold = Released::hold(cuda, ort().ReleaseCUDAProviderOptions);
            const std::string device = std::to_string(device_);
            const char *keys[] = {"device_id"};
            const char *values[] = {device.c_str()};
            check(ort().UpdateCUDAProviderOptions(cuda, keys, values, 1), "CUDA options");
            check(ort().SessionOptionsAppendExecutionProvider_CUDA_V2(options.get(), cuda), "adding the CUDA provider");
        }
        OrtSession *session = nullptr;
        check(ort().CreateSession(env_.get(), c.graph.c_str(), options.get(), &session), "loading " + c.graph.string());
        return std::make_unique<OrtGraph>(env_, Released::hold(session, ort().ReleaseSession), c.name);
    }

private:
    std::shared_ptr<OrtEnv> env_;
    std::vector<std::string> providers_;
    std::string name_;
    int32_t threads_, device_;
};

}  // namespace

bool onnxruntime_built_in() { return true; }

std::shared_ptr<Backend> make_onnxruntime_backend(const eclipse_onnxruntime_options &options) {
    return std::make_shared<OnnxRuntimeBackend>(options);
}

}  // namespace eclipse::core

#else  // built without ONNX Runtime

namespace eclipse::core {

bool onnxruntime_built_in() { return false; }

std::shared_ptr<Backend> make_onnxruntime_backend(const eclipse_onnxruntime_options &) {
    throw Error(ECLIPSE_ERR_UNSUPPORTED,
                "this eclipse library was built without ONNX Runtime; configure with -DECLIPSE_WITH_ONNXRUNTIME=ON "
                "-DECLIPSE_ORT_INCLUDE_DIR=... -DECLIPSE_ORT_LIBRARY=... (README: Embedding in C/C++)");
}

}  // namespace eclipse::core

#endif
