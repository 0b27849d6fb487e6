// eclipse-cuda-check: the TensorRT backend's CUDA, NVRTC and TensorRT calls, made through the
// backend's own code against whatever real libraries this machine has (tests/test_cpp_tensorrt.py
// runs it with the NVRTC wheels, a stand-in NVIDIA driver that answers "no device", and
// TensorRT-RTX's pip library). Every outcome is printed as JSON; nothing here may crash.
//
//   eclipse-cuda-check nvrtc LIBNVRTC OUT_DIR SM...   compile the embedded guided_step per SM
//   eclipse-cuda-check nvrtc-error LIBNVRTC           a compile error's message
//   eclipse-cuda-check driver                         every driver wrapper, no device expected
//   eclipse-cuda-check context                        the caller's CUDA context is current again after
//                                                     every library entry (a driver that tracks contexts)
//   eclipse-cuda-check device                         ON A GPU: the C++ CUDA layer for real (cuda_device_check.cpp)
//   eclipse-cuda-check tensorrt [PLAN]                the TensorRT library calls (TensorRT builds)
#include <dlfcn.h>

#include <cmath>
#include <cstdio>
#include <fstream>
#include <functional>
#include <string>

#include <nlohmann/json.hpp>

#include "cuda/cuda_stream.hpp"
#include "cuda/nvrtc.hpp"
#ifdef ECLIPSE_WITH_TENSORRT
#include "backends/tensorrt_api.hpp"
#endif

using namespace eclipse::core;
using nlohmann::json;

int run_device_check(int argc, char **argv);  // cuda_device_check.cpp: the GPU half

namespace {

json g_outcomes = json::object();

// "ok", "error: <the backend's message>", or "BUG ..." for anything that is not the backend's Error
void attempt(const std::string &name, const std::function<void()> &fn) {
    try {
        fn();
        g_outcomes[name] = "ok";
    } catch (const Error &e) {
        g_outcomes[name] = std::string("error: ") + e.what();
    } catch (const std::exception &e) {
        g_outcomes[name] = std::string("BUG std::exception: ") + e.what();
    } catch (...) {
        g_outcomes[name] = "BUG unknown exception";
    }
}

int nvrtc(int argc, char **argv) {
    if (argc < 5) return 2;
    auto n = Nvrtc::open(argv[2], 13);
    const auto [major, minor] = n->version();
    json out = {{"library", n->path()}, {"version", std::to_string(major) + "." + std::to_string(minor)},
                {"archs", n->supported_archs()}, {"kernels", json::array()}};
    for (int i = 4; i < argc; ++i) {
        const int sm = std::stoi(argv[i]);
        const CompiledKernel k = n->compile(guided_step_source(), "guided_step", sm);
        const std::string path = std::string(argv[3]) + "/guided_step." + k.arch + "." + k.kind;
        std::ofstream(path, std::ios::binary).write(k.image.data(), static_cast<std::streamsize>(k.image.size()));
        out["kernels"].push_back({{"sm", sm}, {"kind", k.kind}, {"arch", k.arch}, {"bytes", k.image.size()}, {"file", path}});
    }
    std::printf("%s\n", out.dump().c_str());
    return 0;
}

int nvrtc_error(int argc, char **argv) {
    if (argc < 3) return 2;
    auto n = Nvrtc::open(argv[2], 13);
    attempt("compile error", [&] { n->compile("extern \"C\" __global__ void broken() { undefined_thing(); }", "broken", 87); });
    attempt("unknown architecture", [&] { n->compile(guided_step_source(), "guided_step", 10); });
    std::printf("%s\n", json{{"outcomes", g_outcomes}}.dump().c_str());
    return 0;
}

int driver() {
    std::shared_ptr<const CudaDriver> d;
    attempt("open", [&] { d = CudaDriver::open(); });
    if (!d) {
        std::printf("%s\n", json{{"outcomes", g_outcomes}}.dump().c_str());
        return 0;
    }
    attempt("driver_version", [&] { g_outcomes["driver_version_value"] = d->driver_version(); });
    attempt("device", [&] { d->device(0); });
    attempt("retain_primary_context", [&] { d->retain_primary_context(0); });
    attempt("ContextGuard", [&] { ContextGuard g(*d, nullptr); });
    attempt("release_primary_context", [&] { d->release_primary_context(0); });
    attempt("CudaStream", [&] { CudaStream s(d, nullptr, nullptr); });
    auto nv = Nvrtc::open("", 13);
    CudaDevice orin;  // past the device query: compile for SM 8.7, then load
    orin.major = 8, orin.minor = 7;
    attempt("GuidedStepKernel", [&] { GuidedStepKernel k(d, nullptr, *nv, orin); });
    auto s = CudaStream::adopt(d, nullptr, nullptr, nullptr);
    const float host[4] = {1, 2, 3, 4};
    float back[4];
    attempt("malloc", [&] { s->malloc(16); });
    attempt("free", [&] { s->free(4096); });
    attempt("upload", [&] { s->upload(4096, host, sizeof host); });
    attempt("download", [&] { s->download(back, 4096, sizeof back); });
    attempt("copy", [&] { s->copy(4096, 8192, 16); });
    attempt("fill_u32", [&] { s->fill_u32(4096, 0, 1); });
    attempt("synchronize", [&] { s->synchronize(); });
    attempt("begin_capture", [&] { s->begin_capture(); });
    attempt("end_capture", [&] { s->end_capture(); });
    attempt("launch_graph", [&] { s->launch_graph(nullptr); });
    attempt("destroy_graph", [&] { s->destroy_graph(reinterpret_cast<void *>(16)); });
    attempt("create_event", [&] { s->create_event(); });
    attempt("record_event", [&] { s->record_event(nullptr); });
    attempt("wait_event", [&] { s->wait_event(nullptr); });
    attempt("destroy_event", [&] { s->destroy_event(reinterpret_cast<void *>(16)); });
    attempt("guided_step without a kernel", [&] { s->guided_step({}); });
    GuidedStepArgs a;
    a.pred = 4096, a.latents = 8192, a.sample_out = 12288, a.n = 1024, a.cfg = 1, a.scale = 4.0f;
    a.k = {0.9f, 0.4f, INFINITY, 0.3f, 0.6f, 0.1f, 0.05f};
    a.bad_step = 16384, a.step = 3;
    attempt("launch_guided_step", [&] { launch_guided_step(*d, nullptr, nullptr, a); });
    std::printf("%s\n", json{{"outcomes", g_outcomes}, {"entry_points", CudaDriver::entry_points()}}.dump().c_str());
    return 0;
}

// The context the calling thread has current, read from the driver itself (not through the
// library's own table: the check must not trust what it checks).
CUcontext current_context() {
    void *lib = dlopen("libcuda.so.1", RTLD_NOW | RTLD_NOLOAD);
    auto get = lib ? reinterpret_cast<CUresult (*)(CUcontext *)>(dlsym(lib, "cuCtxGetCurrent")) : nullptr;
    CUcontext c = reinterpret_cast<CUcontext>(uintptr_t{0xBAD});
    if (get) get(&c);
    return c;
}

std::string hex(CUcontext c) {
    char buf[32];
    std::snprintf(buf, sizeof buf, "%#llx", static_cast<unsigned long long>(reinterpret_cast<uintptr_t>(c)));
    return buf;
}

// Issue 18 #5: every entry leaves the caller's context current, returning or throwing. Run with a
// stand-in driver whose context calls work (tests/data/stub_libcuda.c built with STUB_CONTEXTS)
// and everything else answers "no device": each library call fails after pushing our context.
int context() {
    auto d = CudaDriver::open();
    void *lib = dlopen("libcuda.so.1", RTLD_NOW | RTLD_NOLOAD);
    auto set = reinterpret_cast<CUresult (*)(CUcontext)>(dlsym(lib, "cuCtxSetCurrent"));
    const CUcontext caller = reinterpret_cast<CUcontext>(uintptr_t{0xCA11E5});  // the application's own
    const CUcontext ours = reinterpret_cast<CUcontext>(uintptr_t{0x0C7C7});
    set(caller);
    json seen = json::object();
    auto after = [&](const std::string &name, const std::function<void()> &fn) {
        attempt(name, fn);
        seen[name] = hex(current_context());
    };
    auto nv = Nvrtc::open("", 13);
    CudaDevice orin;
    orin.major = 8, orin.minor = 7;
    CUcontext inside = nullptr;
    after("ContextGuard", [&] {
        ContextGuard g(*d, ours);
        inside = current_context();
        ContextGuard nested(*d, ours);
    });
    after("CudaStream", [&] { CudaStream s(d, ours, nullptr); });
    after("GuidedStepKernel", [&] { GuidedStepKernel k(d, ours, *nv, orin); });
    after("~CudaStream", [&] { CudaStream::adopt(d, ours, nullptr, reinterpret_cast<CUstream>(uintptr_t{16})); });
    after("retain_primary_context", [&] { d->retain_primary_context(0); });
    std::printf("%s\n", json{{"caller", hex(caller)}, {"inside", hex(inside)}, {"ours", hex(ours)}, {"after", seen},
                             {"outcomes", g_outcomes}}.dump().c_str());
    return 0;
}

#ifdef ECLIPSE_WITH_TENSORRT
int tensorrt(int argc, char **argv) {
    std::shared_ptr<const TrtLibrary> lib;
    TrtLogger logger;
    attempt("open", [&] { lib = TrtLibrary::open(""); });
    json out = {{"flavour", kTrtFlavour}, {"headers", std::to_string(NV_TENSORRT_MAJOR) + "." + std::to_string(NV_TENSORRT_MINOR)}};
    if (lib) {
        out["library"] = lib->path();
        out["version"] = lib->version();
        out["version_like_3"] = lib->version_like("1.2.3");
        std::shared_ptr<nvinfer1::IRuntime> runtime;
        attempt("create_runtime", [&] { runtime.reset(lib->create_runtime(logger)); });
        attempt("require_parser", [&] { lib->require_parser(""); });
        if (runtime && argc >= 3) {
            TrtEngine::Source src;
            src.component = "unet";
            src.plan = argv[2];
            src.rebuild_hint = "rebuild";
            attempt("TrtEngine", [&] { TrtEngine e(lib, runtime, std::make_shared<std::mutex>(), logger, src, ""); });
        }
    }
    attempt("open missing", [&] { TrtLibrary::open("libnvinfer-that-is-not-here.so"); });
    out["outcomes"] = g_outcomes;
    std::printf("%s\n", out.dump().c_str());
    return 0;
}
#endif

}  // namespace

int main(int argc, char **argv) {
    const std::string cmd = argc > 1 ? argv[1] : "";
    try {
        if (cmd == "nvrtc") return nvrtc(argc, argv);
        if (cmd == "nvrtc-error") return nvrtc_error(argc, argv);
        if (cmd == "driver") return driver();
        if (cmd == "context") return context();
        if (cmd == "device") return run_device_check(argc, argv);
#ifdef ECLIPSE_WITH_TENSORRT
        if (cmd == "tensorrt") return tensorrt(argc, argv);
#endif
    } catch (const std::exception &e) {
        std::fprintf(stderr, "error: %s\n", e.what());
        return 1;
    }
    std::fprintf(stderr, "usage: eclipse-cuda-check nvrtc LIB OUT_DIR SM... | nvrtc-error LIB | driver | context | device [OUT_JSON] | tensorrt [PLAN]\n");
    return 2;
}
