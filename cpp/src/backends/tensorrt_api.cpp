#include "backends/tensorrt_api.hpp"

#include <dlfcn.h>

#include <algorithm>
#include <fstream>
#include <map>

#include "core/common.hpp"

#define ECLIPSE_STRINGIFY_(x) #x
#define ECLIPSE_STRINGIFY(x) ECLIPSE_STRINGIFY_(x)

#ifndef ECLIPSE_TRT_DEFAULT_LIBRARY
#if ECLIPSE_TENSORRT_RTX
#define ECLIPSE_TRT_DEFAULT_LIBRARY "libtensorrt_rtx.so." ECLIPSE_STRINGIFY(NV_TENSORRT_MAJOR)
#else
#define ECLIPSE_TRT_DEFAULT_LIBRARY "libnvinfer.so." ECLIPSE_STRINGIFY(NV_TENSORRT_MAJOR)
#endif
#endif
#ifndef ECLIPSE_TRT_DEFAULT_PARSER_LIBRARY
#if ECLIPSE_TENSORRT_RTX
#define ECLIPSE_TRT_DEFAULT_PARSER_LIBRARY "libtensorrt_onnxparser_rtx.so." ECLIPSE_STRINGIFY(NV_TENSORRT_MAJOR)
#else
#define ECLIPSE_TRT_DEFAULT_PARSER_LIBRARY "libnvonnxparser.so." ECLIPSE_STRINGIFY(NV_TENSORRT_MAJOR)
#endif
#endif

namespace eclipse::core {
namespace {

thread_local std::vector<std::string> t_errors;

template <class F>
F symbol(void *handle, const char *name, const std::string &path) {
    void *p = dlsym(handle, name);
    if (!p) backend_error(path + " is not " + kTrtFlavour + " (it has no " + name + ")");
    return reinterpret_cast<F>(p);
}

std::string with_errors(const std::string &message) {
    const std::string errors = TrtLogger::take_errors();
    return errors.empty() ? message : message + " (TensorRT: " + errors + ")";
}

}  // namespace

// ---- logger ----------------------------------------------------------------------------------

void TrtLogger::log(Severity severity, nvinfer1::AsciiChar const *message) noexcept {
    try {
        const std::string text = std::string(kTrtFlavour) + ": " + (message ? message : "");
        switch (severity) {
            case Severity::kINTERNAL_ERROR:
            case Severity::kERROR:
                t_errors.emplace_back(message ? message : "");
                eclipse::core::log(ECLIPSE_LOG_ERROR, text);
                break;
            case Severity::kWARNING: eclipse::core::log(ECLIPSE_LOG_WARN, text); break;
            case Severity::kINFO: eclipse::core::log(ECLIPSE_LOG_DEBUG, text); break;
            default: break;  // kVERBOSE
        }
    } catch (...) {  // TensorRT calls this noexcept
    }
}

std::string TrtLogger::take_errors() {
    std::string out;
    for (const auto &e : t_errors) out += (out.empty() ? "" : "; ") + e;
    t_errors.clear();
    return out;
}

// ---- library ---------------------------------------------------------------------------------

std::string TrtLibrary::default_path() { return ECLIPSE_TRT_DEFAULT_LIBRARY; }
std::string TrtLibrary::default_parser_path() { return ECLIPSE_TRT_DEFAULT_PARSER_LIBRARY; }

std::shared_ptr<const TrtLibrary> TrtLibrary::open(const std::string &given) {
    static std::mutex mutex;
    static std::map<std::string, std::shared_ptr<const TrtLibrary>> opened;
    const std::string path = given.empty() ? default_path() : given;
    std::lock_guard<std::mutex> lock(mutex);
    if (auto it = opened.find(path); it != opened.end()) return it->second;
    void *handle = dlopen(path.c_str(), RTLD_NOW | RTLD_LOCAL);
    if (!handle)
        backend_error(std::string(kTrtFlavour) + " cannot be loaded (" + dlerror() + "); " +
                      (ECLIPSE_TENSORRT_RTX ? "pip install tensorrt-rtx (its tensorrt_rtx_libs folder holds the library) "
                                              "or NVIDIA's TensorRT-RTX SDK, and name it in library_path"
                                            : "install TensorRT " ECLIPSE_STRINGIFY(NV_TENSORRT_MAJOR) ".x (JetPack ships it; "
                                              "x86-64: NVIDIA's TensorRT packages) or name the library in library_path"));
    std::shared_ptr<TrtLibrary> lib(new TrtLibrary());
    lib->path_ = path;
    lib->major_ = symbol<int32_t (*)()>(handle, "getInferLibMajorVersion", path);
    lib->minor_ = symbol<int32_t (*)()>(handle, "getInferLibMinorVersion", path);
    lib->patch_ = symbol<int32_t (*)()>(handle, "getInferLibPatchVersion", path);
    lib->build_ = symbol<int32_t (*)()>(handle, "getInferLibBuildVersion", path);
    lib->create_runtime_ = symbol<void *(*)(void *, int32_t)>(handle, "createInferRuntime_INTERNAL", path);
    lib->create_refitter_ = symbol<void *(*)(void *, void *, int32_t)>(handle, "createInferRefitter_INTERNAL", path);
    // The headers' classes call into the library's implementation objects by position: only the
    // major version they were written for is ABI-compatible (a newer minor keeps the old calls).
    if (lib->major_() != NV_TENSORRT_MAJOR || lib->minor_() < NV_TENSORRT_MINOR)
        backend_error(path + " is " + kTrtFlavour + " " + lib->version() + ", this eclipse library was built for " + kTrtFlavour +
                      " " + std::to_string(NV_TENSORRT_MAJOR) + "." + std::to_string(NV_TENSORRT_MINOR) +
                      "+ (same major): rebuild libeclipse against the installed TensorRT's headers");
    return opened[path] = lib;
}

std::string TrtLibrary::version() const {
    return std::to_string(major_()) + "." + std::to_string(minor_()) + "." + std::to_string(patch_()) + "." +
           std::to_string(build_());
}

std::string TrtLibrary::version_like(const std::string &as_written) const {
    const size_t parts = static_cast<size_t>(std::count(as_written.begin(), as_written.end(), '.')) + 1;
    const std::string full = version();
    size_t end = 0;
    for (size_t i = 0; i < parts && end != std::string::npos; ++i) end = full.find('.', end + (i ? 1 : 0));
    return end == std::string::npos ? full : full.substr(0, end);
}

nvinfer1::IRuntime *TrtLibrary::create_runtime(TrtLogger &logger) const {
    auto *runtime = static_cast<nvinfer1::IRuntime *>(create_runtime_(&logger, NV_TENSORRT_VERSION));
    if (!runtime) backend_error(with_errors(std::string(kTrtFlavour) + " " + version() + " could not create a runtime"));
    return runtime;
}

nvinfer1::IRefitter *TrtLibrary::create_refitter(nvinfer1::ICudaEngine &engine, TrtLogger &logger) const {
    auto *refitter = static_cast<nvinfer1::IRefitter *>(create_refitter_(&engine, &logger, NV_TENSORRT_VERSION));
    if (!refitter) backend_error(with_errors("no refitter for a weight-stripped engine"));
    return refitter;
}

void TrtLibrary::require_parser(const std::string &given) const {
    std::lock_guard<std::mutex> lock(parser_mutex_);
    if (create_parser_refitter_) return;
    const std::string path = given.empty() ? default_parser_path() : given;
    void *handle = dlopen(path.c_str(), RTLD_NOW | RTLD_LOCAL);
    if (!handle)
        backend_error(std::string("weight-stripped engines are refitted from the bundle's ONNX with ") + kTrtFlavour +
                      "'s ONNX parser, which cannot be loaded (" + dlerror() + "); install it or name it in onnx_parser_library_path");
    create_parser_refitter_ = symbol<void *(*)(void *, void *, int32_t)>(handle, "createNvOnnxParserRefitter_INTERNAL", path);
    parser_path_ = path;
}

nvonnxparser::IParserRefitter *TrtLibrary::create_parser_refitter(nvinfer1::IRefitter &refitter, TrtLogger &logger,
                                                                  const std::string &parser_path) const {
    require_parser(parser_path);
    auto *p = static_cast<nvonnxparser::IParserRefitter *>(create_parser_refitter_(&refitter, &logger, NV_ONNX_PARSER_VERSION));
    if (!p) backend_error(with_errors("the ONNX parser (" + parser_path_ + ") could not create a refitter"));
    return p;
}

// ---- engine ----------------------------------------------------------------------------------

IoTensor io_tensor(const std::string &name, bool input, nvinfer1::DataType type) {
    using nvinfer1::DataType;
    IoTensor t;
    t.name = name;
    t.input = input;
    switch (type) {
        case DataType::kFLOAT: t.type = IoType::Float32, t.element_bytes = 4, t.type_name = "float32"; break;
        case DataType::kINT32: t.type = IoType::Int32, t.element_bytes = 4, t.type_name = "int32"; break;
        case DataType::kHALF: t.element_bytes = 2, t.type_name = "float16"; break;
        case DataType::kBF16: t.element_bytes = 2, t.type_name = "bfloat16"; break;
        case DataType::kINT64: t.element_bytes = 8, t.type_name = "int64"; break;
        case DataType::kINT8: t.element_bytes = 1, t.type_name = "int8"; break;
        case DataType::kUINT8: t.element_bytes = 1, t.type_name = "uint8"; break;
        case DataType::kBOOL: t.element_bytes = 1, t.type_name = "bool"; break;
        default:  // FP8, INT4, FP4, ...: never graph I/O here; sized generously
            t.element_bytes = 8, t.type_name = "TensorRT data type " + std::to_string(static_cast<int>(type));
    }
    return t;
}

TrtEngine::TrtEngine(std::shared_ptr<const TrtLibrary> library, std::shared_ptr<nvinfer1::IRuntime> runtime,
                     std::shared_ptr<std::mutex> runtime_mutex, TrtLogger &logger, Source source, const std::string &parser_path)
    : library_(std::move(library)), runtime_(std::move(runtime)), source_(std::move(source)) {
    std::string plan;
    if (!read_file(source_.plan, plan)) throw Error(ECLIPSE_ERR_BUNDLE, "cannot read " + source_.plan.string());
    {
        std::lock_guard<std::mutex> lock(*runtime_mutex);  // one deserialization at a time per runtime
        TrtLogger::take_errors();
        engine_.reset(runtime_->deserializeCudaEngine(plan.data(), plan.size()));
    }
    if (!engine_)
        backend_error(with_errors(source_.component + ": " + source_.plan.filename().string() + " did not deserialize") + "; " +
                      source_.rebuild_hint);
    if (source_.strip_weights) refit(logger, parser_path);
    for (int32_t i = 0; i < engine_->getNbIOTensors(); ++i) {
        const char *name = engine_->getIOTensorName(i);
        tensors_.push_back(io_tensor(name, engine_->getTensorIOMode(name) == nvinfer1::TensorIOMode::kINPUT,
                                     engine_->getTensorDataType(name)));
    }
#if ECLIPSE_TENSORRT_RTX
    // RTX compiles kernels for this GPU on first use; its runtime cache keeps them across runs
    // (one cache per engine, shared by every execution context's runtime config)
    cache_config_.reset(engine_->createRuntimeConfig());
    if (!cache_config_) backend_error(with_errors(source_.component + ": no runtime config"));
    cache_.reset(cache_config_->createRuntimeCache());
    if (!cache_) backend_error(with_errors(source_.component + ": no runtime cache"));
    if (!source_.runtime_cache.empty() && std::filesystem::is_regular_file(source_.runtime_cache)) {
        std::string b;
        read_file(source_.runtime_cache, b);  // unreadable: empty, refused below like a stale cache
        if (!cache_->deserialize(b.data(), b.size()))  // stale or foreign: RTX rebuilds it
            log(ECLIPSE_LOG_WARN, with_errors(source_.component + ": the runtime cache " + source_.runtime_cache.string() +
                                              " was not usable; TensorRT-RTX compiles its kernels again"));
    }
#endif
}

void TrtEngine::refit(TrtLogger &logger, const std::string &parser_path) {
    std::unique_ptr<nvinfer1::IRefitter> refitter(library_->create_refitter(*engine_, logger));
    std::unique_ptr<nvonnxparser::IParserRefitter> parser(library_->create_parser_refitter(*refitter, logger, parser_path));
    if (!parser->refitFromFile(source_.onnx.c_str())) {
        std::string errors;
        for (int32_t i = 0; i < parser->getNbErrors(); ++i) errors += (i ? "; " : "") + std::string(parser->getError(i)->desc());
        backend_error(source_.component + ": cannot refit the weight-stripped engine from " + source_.onnx.filename().string() +
                      ": " + errors);
    }
    if (!refitter->refitCudaEngine())
        backend_error(with_errors(source_.component + ": TensorRT refused the refit from " + source_.onnx.filename().string()));
}

void TrtEngine::save_runtime_cache() const {
#if ECLIPSE_TENSORRT_RTX
    if (source_.runtime_cache.empty() || !cache_) return;
    std::lock_guard<std::mutex> lock(cache_mutex_);
    std::unique_ptr<nvinfer1::IHostMemory> blob(cache_->serialize());
    if (!blob) return;
    std::error_code ec;
    std::filesystem::create_directories(source_.runtime_cache.parent_path(), ec);
    const auto tmp = source_.runtime_cache.string() + ".tmp";
    {
        std::ofstream out(tmp, std::ios::binary | std::ios::trunc);
        out.write(static_cast<const char *>(blob->data()), static_cast<std::streamsize>(blob->size()));
        if (!out) ec = std::make_error_code(std::errc::io_error);
    }
    if (!ec) std::filesystem::rename(tmp, source_.runtime_cache, ec);  // whole or not at all
    if (ec) {
        std::filesystem::remove(tmp, ec);
        log(ECLIPSE_LOG_WARN, "could not save the TensorRT-RTX runtime cache " + source_.runtime_cache.string());
    }
#endif
}

TrtEngine::~TrtEngine() {
    try {
        save_runtime_cache();
    } catch (...) {
    }
#if ECLIPSE_TENSORRT_RTX
    cache_.reset();
    cache_config_.reset();
#endif
    engine_.reset();
}

TrtEngine::Context TrtEngine::create_context(bool rtx_cuda_graphs) const {
    Context c;
#if ECLIPSE_TENSORRT_RTX
    c.config.reset(engine_->createRuntimeConfig());
    if (!c.config) backend_error(with_errors(source_.component + ": no runtime config"));
    {
        std::lock_guard<std::mutex> lock(cache_mutex_);
        if (!c.config->setRuntimeCache(*cache_)) backend_error(with_errors(source_.component + ": the runtime cache was refused"));
    }
    // RTX captures and replays its own CUDA graphs (the backend's capture is for TensorRT)
    if (rtx_cuda_graphs && !c.config->setCudaGraphStrategy(nvinfer1::CudaGraphStrategy::kWHOLE_GRAPH_CAPTURE))
        log(ECLIPSE_LOG_WARN, with_errors(source_.component + ": TensorRT-RTX refused its CUDA-graph strategy"));
    c.context.reset(engine_->createExecutionContext(c.config.get()));
#else
    (void)rtx_cuda_graphs;
    c.context.reset(engine_->createExecutionContext());
#endif
    if (!c.context)
        throw Error(ECLIPSE_ERR_OUT_OF_MEMORY, with_errors(source_.component + ": no execution context (out of device memory?)") +
                                                   "; try low-memory mode (--low-memory)");
    return c;
}

// ---- execution context -----------------------------------------------------------------------

TrtContext::TrtContext(std::shared_ptr<const TrtEngine> engine, TrtEngine::Context context, void *stream)
    : engine_(std::move(engine)), context_(std::move(context)), stream_(stream) {}

bool TrtContext::set_input_shape(const std::string &name, const std::vector<int64_t> &shape) {
    nvinfer1::Dims dims{};
    if (shape.size() > static_cast<size_t>(nvinfer1::Dims::MAX_DIMS)) return false;
    dims.nbDims = static_cast<int32_t>(shape.size());
    for (size_t i = 0; i < shape.size(); ++i) dims.d[i] = shape[i];
    return context_.context->setInputShape(name.c_str(), dims);
}

std::vector<int64_t> TrtContext::shape(const std::string &name) const {
    const nvinfer1::Dims dims = context_.context->getTensorShape(name.c_str());
    if (dims.nbDims < 0) return {-1};
    return std::vector<int64_t>(dims.d, dims.d + dims.nbDims);
}

void TrtContext::set_address(const std::string &name, DevicePtr p) {
    if (!context_.context->setTensorAddress(name.c_str(), reinterpret_cast<void *>(static_cast<uintptr_t>(p))))
        backend_error(with_errors(engine_->source().component + "." + name + ": TensorRT refused the buffer address"));
}

bool TrtContext::enqueue() { return context_.context->enqueueV3(static_cast<cudaStream_t>(stream_)); }

}  // namespace eclipse::core
