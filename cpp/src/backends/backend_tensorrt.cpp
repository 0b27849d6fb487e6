// TensorRT (10.3 / 11.x) and TensorRT-RTX backend: the bundle's engines on an NVIDIA GPU, as
// runtime/backends/tensorrt.py runs them. Built only with -DECLIPSE_WITH_TENSORRT=ON and the
// flavour's headers; otherwise creating it says so.
//
//  - Before any engine loads, every engine of the bundle is checked against the installed
//    TensorRT and this GPU (engine_problems): one error names them all and the rebuild command.
//  - Engines are immutable and shared by every state (TrtEngine); each eclipse_state gets its own
//    CUDA stream, execution context(s), grow-only device buffers and CUDA graph (TrtState).
//  - The UNet loop stays on the device (device_loop.cpp): the fused guidance + step kernel
//    (NVRTC, compiled at backend creation for this GPU's sm_XX) and the UNet enqueue captured
//    once into a CUDA graph and replayed (TensorRT) or TensorRT-RTX's own graph strategy.
//  - Low-memory mode: an engine is deserialized when its stage starts and freed when it ends
//    (stage_done), so at most one is resident per generation.
#include "core/backend.hpp"

#ifdef ECLIPSE_WITH_TENSORRT

#include <cstdlib>
#include <map>
#include <mutex>

#include "cuda/cuda_stream.hpp"
#include "backends/tensorrt_api.hpp"

#ifndef ECLIPSE_NVRTC_DEFAULT_LIBRARY
#define ECLIPSE_NVRTC_DEFAULT_LIBRARY ""  // libnvrtc.so.<driver's CUDA major>, then older
#endif

using nlohmann::json;

namespace eclipse::core {
namespace {

std::string rebuild_hint(const Bundle &bundle) {
    return std::string("rebuild on this machine: eclipse-export ... --target ") + (ECLIPSE_TENSORRT_RTX ? "trt-rtx-fp16" : "trt-fp16") +
           " --out " + bundle.root().string() + " --overwrite";
}

std::filesystem::path default_runtime_cache_dir() {
    const char *xdg = std::getenv("XDG_CACHE_HOME");
    const char *home = std::getenv("HOME");
    std::filesystem::path base = xdg && *xdg ? xdg : (home && *home ? std::filesystem::path(home) / ".cache" : "");
    return base.empty() ? base : base / "eclipse-export" / "rtx-runtime-cache";
}

// What every session and state of one backend shares: the device, its primary context, the
// compiled kernel, TensorRT's runtime. Immutable after creation.
struct Gpu {
    eclipse_tensorrt_options options{};
    std::string parser_path, cache_dir;
    std::shared_ptr<const CudaDriver> driver;
    CudaDevice device;
    CUcontext context = nullptr;
    std::shared_ptr<const Nvrtc> nvrtc;
    std::shared_ptr<const GuidedStepKernel> kernel;
    std::shared_ptr<const TrtLibrary> library;
    std::unique_ptr<TrtLogger> logger;
    std::shared_ptr<nvinfer1::IRuntime> runtime;
    std::shared_ptr<std::mutex> runtime_mutex = std::make_shared<std::mutex>();

    ~Gpu() {
        if (context) {
            // TensorRT's runtime and the kernel's module are freed in their context
            ContextGuard guard(*driver, context, std::nothrow);
            runtime.reset();
            kernel.reset();
        }
        if (context) driver->release_primary_context(device.index);
    }
    // Every entry into the backend holds one: the primary context current inside, the caller's
    // own context (or none) current again when it returns (issue 18 #5).
    ContextGuard enter() const { return ContextGuard(*driver, context); }
};

class TrtSession;

// Per request state of one component: stream, execution context, bindings, loop buffers.
class TrtState final : public SessionState {
public:
    TrtState(std::shared_ptr<const Gpu> gpu, bool unet) : gpu_(std::move(gpu)) {
        const ContextGuard guard = gpu_->enter();
        stream_ = std::make_unique<CudaStream>(gpu_->driver, gpu_->context, unet ? gpu_->kernel : nullptr);
        if (unet) loop_ = std::make_unique<LoopBuffers>(*stream_);
    }
    ~TrtState() override {
        // the graph, context, buffers and stream are freed in their context, inside this body
        const ContextGuard guard(*gpu_->driver, gpu_->context, std::nothrow);
        release();
        loop_.reset();
        stream_.reset();
    }

    // The engine's execution context and bindings for this state (low-memory: loads the engine).
    Binding &binding(const TrtSession &session);
    void release() {  // graph and context before the engine, everything before the stream
        binding_.reset();
        context_.reset();
        engine_.reset();
    }
    CudaStream &stream() { return *stream_; }
    LoopBuffers &loop() { return *loop_; }

private:
    std::shared_ptr<const Gpu> gpu_;
    std::unique_ptr<CudaStream> stream_;
    std::unique_ptr<LoopBuffers> loop_;
    std::shared_ptr<const TrtEngine> engine_;
    std::unique_ptr<TrtContext> context_;
    std::unique_ptr<Binding> binding_;
};

class TrtSession final : public Session {
public:
    TrtSession(std::shared_ptr<const Gpu> gpu, TrtEngine::Source source, std::vector<std::string> io_names, std::string profile)
        : gpu_(std::move(gpu)), source_(std::move(source)), io_names_(std::move(io_names)), profile_(std::move(profile)),
          holder_([this] { return load_engine(); }, gpu_->options.low_memory != 0) {}
    ~TrtSession() override {
        // the held engine is freed in its context (issue 18 #6), before this body's guard pops
        const ContextGuard guard(*gpu_->driver, gpu_->context, std::nothrow);
        holder_.drop();
    }

    // The loaded engine: the one held (normal mode) or the one a state is using now
    // (low-memory), else deserialized now.
    std::shared_ptr<const TrtEngine> acquire() const { return holder_.acquire(); }

    std::unique_ptr<SessionState> new_state() const override {
        // the looped UNets get the step kernels and loop buffers: Kandinsky's, Karlo's decoder and super-resolution
        const std::string &c = source_.component;
        return std::make_unique<TrtState>(gpu_, c == "unet" || c == "decoder" || c == "super_res_first" || c == "super_res_last");
    }

    void run(SessionState *state, const std::vector<TensorView> &inputs, std::vector<TensorView> &outputs) const override {
        auto &s = checked(state);
        const ContextGuard guard = gpu_->enter();
        s.binding(*this).run(inputs, outputs);
    }

    TrtState &checked(SessionState *state) const {
        auto *s = dynamic_cast<TrtState *>(state);
        if (!s) throw Error(ECLIPSE_ERR_INTERNAL, source_.component + ": no TensorRT state for this request");
        return *s;
    }

    const Gpu &gpu() const { return *gpu_; }

    std::shared_ptr<const TrtEngine> load_engine() const {
        const ContextGuard guard = gpu_->enter();
        auto engine = std::make_shared<const TrtEngine>(gpu_->library, gpu_->runtime, gpu_->runtime_mutex, *gpu_->logger,
                                                        source_, gpu_->parser_path);
        std::string missing;
        for (const auto &name : io_names_) {
            bool found = false;
            for (const auto &t : engine->tensors()) found = found || t.name == name;
            if (!found) missing += (missing.empty() ? "" : ", ") + name;
        }
        if (!missing.empty())
            throw Error(ECLIPSE_ERR_BACKEND, source_.component + ": the engine lacks tensors " + missing + "; " + source_.rebuild_hint);
        return engine;
    }
    const TrtEngine::Source &source() const { return source_; }
    BindingOptions binding_options() const {
        // TensorRT-RTX replays its own CUDA graphs (its runtime config's strategy)
        return {source_.component, gpu_->options.cuda_graphs != 0 && !ECLIPSE_TENSORRT_RTX, profile_, source_.rebuild_hint};
    }

private:
    std::shared_ptr<const Gpu> gpu_;
    TrtEngine::Source source_;
    std::vector<std::string> io_names_;
    std::string profile_;
    EngineHolder<TrtEngine> holder_;  // declared last: it may load the engine in the constructor
};

Binding &TrtState::binding(const TrtSession &session) {
    if (binding_) return *binding_;
    engine_ = session.acquire();
    context_ = std::make_unique<TrtContext>(engine_, engine_->create_context(session.gpu().options.cuda_graphs != 0),
                                            stream_->get());
    BindingOptions options = session.binding_options();
    options.warnings = &warnings;
    binding_ = std::make_unique<Binding>(*stream_, *context_, std::move(options));
    return *binding_;
}

class TensorRTBackend final : public Backend {
public:
    explicit TensorRTBackend(const eclipse_tensorrt_options &o) {
        auto gpu = std::make_shared<Gpu>();
        gpu->options = o;
        gpu->parser_path = o.onnx_parser_library_path ? o.onnx_parser_library_path : "";
        gpu->cache_dir = o.runtime_cache_dir ? std::string(o.runtime_cache_dir) : default_runtime_cache_dir().string();
        // everything the GPU loop needs, checked before any engine: one error listing all
        std::vector<std::string> problems;
        int cuda_major = CUDA_VERSION / 1000;
        try {
            gpu->driver = CudaDriver::open();
            try {  // the NVRTC to look for first: the driver's CUDA major
                cuda_major = gpu->driver->driver_version() / 1000;
            } catch (const Error &) {
            }
            gpu->device = gpu->driver->device(o.device_id);
        } catch (const Error &e) {
            if (e.status != ECLIPSE_ERR_BACKEND) throw;
            problems.push_back(e.what());
        }
        try {
            gpu->nvrtc = Nvrtc::open(o.nvrtc_library_path ? o.nvrtc_library_path : ECLIPSE_NVRTC_DEFAULT_LIBRARY, cuda_major);
        } catch (const Error &e) {
            problems.push_back(e.what());
        }
        try {
            gpu->library = TrtLibrary::open(o.library_path ? o.library_path : "");
        } catch (const Error &e) {
            problems.push_back(e.what());
        }
        if (!problems.empty())
            backend_error(std::string("the ") + kTrtFlavour + " backend cannot run here: " + join(problems));
        gpu->context = gpu->driver->retain_primary_context(o.device_id);
        const ContextGuard guard = gpu->enter();
        gpu->kernel = std::make_shared<const GuidedStepKernel>(gpu->driver, gpu->context, *gpu->nvrtc, gpu->device);
        gpu->logger = std::make_unique<TrtLogger>();
        gpu->runtime.reset(gpu->library->create_runtime(*gpu->logger));
        gpu_ = gpu;
        log(ECLIPSE_LOG_INFO, std::string(kTrtFlavour) + " " + gpu->library->version() + " on " + gpu->device.name + " (" +
                                  gpu->device.compute_capability() + "), guided_step " + gpu->kernel->compiled().kind + " for " +
                                  gpu->kernel->compiled().arch + (o.low_memory ? ", low-memory" : "") +
                                  (o.cuda_graphs ? "" : ", no CUDA graphs"));
    }

    std::string name() const override { return kTrtFlavour; }

    void preflight(const Bundle &bundle) const override {
        const json engines = bundle.manifest().value("engines", json::object());
        std::vector<std::string> problems;
        bool strips = false;
        for (const char *name : {"text_encoder", "prior", "unet", "movq"}) {
            if (!engines.is_object() || !engines.contains(name)) {
                problems.push_back(std::string(name) + ": the bundle has no engine (target " +
                                   bundle.manifest().value("target", json("?")).dump() + "; export with --target " +
                                   (ECLIPSE_TENSORRT_RTX ? "trt-rtx-fp16" : "trt-fp16") + ")");
                continue;
            }
            const json &entry = engines[name];
            if (entry.value("flavour", "") != kTrtFlavour) {
                problems.push_back(std::string(name) + ": the engine is " + entry.value("flavour", "?") + ", this backend runs " +
                                   kTrtFlavour);
                continue;
            }
            strips = strips || entry.value("strip_weights", false);
            const std::string written = entry.value("version", "");
            for (const auto &p : engine_problems(entry, gpu_->library->version_like(written), gpu_->device.compute_capability()))
                problems.push_back(std::string(name) + ": " + p);
        }
        if (!problems.empty())
            backend_error("the bundle's engines cannot run here: " + join(problems) + "; " + rebuild_hint(bundle));
        if (strips) gpu_->library->require_parser(gpu_->parser_path);  // before any engine loads
    }

    std::unique_ptr<Session> load(const Bundle &bundle, const ComponentFiles &c) const override {
        if (!c.engine) throw Error(ECLIPSE_ERR_BACKEND, "bundle " + bundle.root().string() + " has no engine for " + c.name);
        const json &entry = *c.engine;
        TrtEngine::Source source;
        source.component = c.name;
        source.plan = bundle.path(entry.at("file").get<std::string>());
        source.onnx = c.graph;
        source.strip_weights = entry.value("strip_weights", false);
        source.rebuild_hint = rebuild_hint(bundle);
        if (ECLIPSE_TENSORRT_RTX && !gpu_->cache_dir.empty())
            source.runtime_cache = std::filesystem::path(gpu_->cache_dir) / (entry.value("key", c.name) + ".rtcache");
        std::vector<std::string> io_names;
        const json &io = bundle.component(c.name).at("io");
        for (const char *side : {"inputs", "outputs"}) {
            for (const auto &t : io.at(side)) io_names.push_back(t.at("name").get<std::string>());
        }
        const std::string profile = entry.contains("profile") ? "(profile " + entry["profile"].dump() + ")" : "";
        return std::make_unique<TrtSession>(gpu_, std::move(source), std::move(io_names), profile);
    }

    void stage_done(const Session &session, SessionState *state) const override {
        if (!gpu_->options.low_memory || state == nullptr) return;
        auto &s = static_cast<const TrtSession &>(session).checked(state);
        const ContextGuard guard = gpu_->enter();
        s.stream().synchronize();
        s.release();  // the last state to let go frees the engine (and saves its RTX runtime cache)
    }

    bool has_device_loop() const override { return true; }

    bool denoise(const Session &unet, SessionState *state, const eclipse_denoise_call &call) const override {
        const auto &session = static_cast<const TrtSession &>(unet);
        auto &s = session.checked(state);
        const ContextGuard guard = gpu_->enter();
        return denoise_on_device(s.stream(), s.binding(session), s.loop(), call);
    }

    bool has_unclip_loop() const override { return true; }

    bool denoise_unclip(const std::vector<std::pair<const Session *, SessionState *>> &unets,
                        const UnclipLoopCall &call) const override {
        std::vector<UnclipUnet> loop;
        for (const auto &[session, state] : unets) {
            const auto &trt = static_cast<const TrtSession &>(*session);
            TrtState &s = trt.checked(state);
            loop.push_back({&s.stream(), [&trt, &s]() -> Binding & { return s.binding(trt); }, trt.source().component});
        }
        TrtState &first = static_cast<const TrtSession &>(*unets[0].first).checked(unets[0].second);
        const ContextGuard guard = gpu_->enter();
        return denoise_unclip_on_device(first.loop(), loop, call, [&] {
            if (gpu_->options.low_memory) first.release();  // one engine resident: the first goes before the last loads
        });
    }

private:
    std::shared_ptr<const Gpu> gpu_;
};

}  // namespace

std::shared_ptr<Backend> make_tensorrt_backend(const eclipse_tensorrt_options &options) {
    return std::make_shared<TensorRTBackend>(options);
}

const char *tensorrt_flavour_built_in() { return kTrtFlavour; }

}  // namespace eclipse::core

#else  // built without TensorRT

namespace eclipse::core {

const char *tensorrt_flavour_built_in() { return nullptr; }

std::shared_ptr<Backend> make_tensorrt_backend(const eclipse_tensorrt_options &) {
    throw Error(ECLIPSE_ERR_UNSUPPORTED,
                "this eclipse library was built without the TensorRT backend; configure with -DECLIPSE_WITH_TENSORRT=ON "
                "-DECLIPSE_TENSORRT_INCLUDE_DIR=... -DECLIPSE_CUDA_INCLUDE_DIR=... (README: Embedding in C/C++)");
}

}  // namespace eclipse::core

#endif
