// TensorRT (10.3 / 11.x) or TensorRT-RTX, whichever headers this file is compiled with, opened at
// run time with dlopen. TensorRT's C++ API is classes whose methods are inline wrappers around
// the library's implementation objects; the only symbols an application links are the extern "C"
// factories (createInferRuntime_INTERNAL, createInferRefitter_INTERNAL,
// createNvOnnxParserRefitter_INTERNAL) and the version getters, which dlsym finds. So libeclipse
// needs no TensorRT at link or load time, and a machine without it gets a clear error when the
// backend is created, not a loader failure for every app.
//
// One code path where the flavours agree; TensorRT-RTX's own API (runtime cache for its JIT
// kernels, its CUDA-graph strategy) is selected by its version macro TRT_MAJOR_RTX.
#pragma once

#include <NvInfer.h>
#include <NvOnnxParser.h>

#include <filesystem>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "backends/device_loop.hpp"

namespace eclipse::core {

#if defined(TRT_MAJOR_RTX)
#define ECLIPSE_TENSORRT_RTX 1
constexpr const char *kTrtFlavour = "tensorrt-rtx";
#else
#define ECLIPSE_TENSORRT_RTX 0
constexpr const char *kTrtFlavour = "tensorrt";
#endif

// Forwards TensorRT's messages to the library's log and keeps the errors each thread saw, so an
// API call that fails (returns null/false) can say why.
class TrtLogger final : public nvinfer1::ILogger {
public:
    void log(Severity severity, nvinfer1::AsciiChar const *message) noexcept override;
    // The errors logged on this thread since the last call, joined with "; ".
    static std::string take_errors();
};

// The library and its factories, opened once per process and path and never closed.
class TrtLibrary {
public:
    // path "": the build's default (libnvinfer.so.<major>, libtensorrt_rtx.so.<major>).
    // Throws Error(ECLIPSE_ERR_BACKEND) when it cannot be loaded or is another major than the
    // headers this library was compiled with.
    static std::shared_ptr<const TrtLibrary> open(const std::string &path);
    static std::string default_path();
    static std::string default_parser_path();

    const std::string &path() const { return path_; }
    // "10.3.0.30", "1.7.1.116": the library's own numbers
    std::string version() const;
    // version() shortened to as many parts as `as_written` has: the Python runtime writes
    // tensorrt.__version__, which is "10.3.0" in some packagings and "10.3.0.30" in others
    std::string version_like(const std::string &as_written) const;

    nvinfer1::IRuntime *create_runtime(TrtLogger &logger) const;
    nvinfer1::IRefitter *create_refitter(nvinfer1::ICudaEngine &engine, TrtLogger &logger) const;
    // The ONNX parser library is needed only for weight-stripped engines: opened on first use.
    nvonnxparser::IParserRefitter *create_parser_refitter(nvinfer1::IRefitter &refitter, TrtLogger &logger,
                                                          const std::string &parser_path) const;
    void require_parser(const std::string &parser_path) const;

private:
    TrtLibrary() = default;
    std::string path_;
    void *(*create_runtime_)(void *, int32_t) = nullptr;
    void *(*create_refitter_)(void *, void *, int32_t) = nullptr;
    int32_t (*major_)() = nullptr, (*minor_)() = nullptr, (*patch_)() = nullptr, (*build_)() = nullptr;
    mutable std::mutex parser_mutex_;
    mutable void *(*create_parser_refitter_)(void *, void *, int32_t) = nullptr;
    mutable std::string parser_path_;
};

// An engine deserialized from the bundle (and refitted if its weights were stripped);
// immutable, shared by every request state's execution context.
class TrtEngine {
public:
    struct Source {
        std::string component;
        std::filesystem::path plan;        // the engine file (listed, verified, inside the bundle)
        std::filesystem::path onnx;        // its graph, for refitting stripped weights
        bool strip_weights = false;
        std::filesystem::path runtime_cache;  // TensorRT-RTX: "" for none
        std::string rebuild_hint;
    };
    TrtEngine(std::shared_ptr<const TrtLibrary> library, std::shared_ptr<nvinfer1::IRuntime> runtime,
              std::shared_ptr<std::mutex> runtime_mutex, TrtLogger &logger, Source source, const std::string &parser_path);
    ~TrtEngine();  // TensorRT-RTX: saves its runtime cache
    TrtEngine(const TrtEngine &) = delete;
    TrtEngine &operator=(const TrtEngine &) = delete;

    const std::vector<IoTensor> &tensors() const { return tensors_; }
    const Source &source() const { return source_; }
    // An execution context (with TensorRT-RTX's runtime config: runtime cache, CUDA-graph
    // strategy); throws when TensorRT cannot create one (out of device memory).
    struct Context {
#if ECLIPSE_TENSORRT_RTX
        std::unique_ptr<nvinfer1::IRuntimeConfig> config;
#endif
        std::unique_ptr<nvinfer1::IExecutionContext> context;
    };
    Context create_context(bool rtx_cuda_graphs) const;
    void save_runtime_cache() const;

private:
    void refit(TrtLogger &logger, const std::string &parser_path);

    std::shared_ptr<const TrtLibrary> library_;
    std::shared_ptr<nvinfer1::IRuntime> runtime_;  // outlives its engines
    Source source_;
    std::unique_ptr<nvinfer1::ICudaEngine> engine_;
    std::vector<IoTensor> tensors_;
#if ECLIPSE_TENSORRT_RTX
    std::unique_ptr<nvinfer1::IRuntimeConfig> cache_config_;
    std::unique_ptr<nvinfer1::IRuntimeCache> cache_;
    mutable std::mutex cache_mutex_;
#endif
};

// EngineContext over one TensorRT execution context, enqueueing on one stream.
class TrtContext final : public EngineContext {
public:
    TrtContext(std::shared_ptr<const TrtEngine> engine, TrtEngine::Context context, void *stream);
    const std::vector<IoTensor> &tensors() const override { return engine_->tensors(); }
    bool set_input_shape(const std::string &name, const std::vector<int64_t> &shape) override;
    std::vector<int64_t> shape(const std::string &name) const override;
    void set_address(const std::string &name, DevicePtr p) override;
    bool enqueue() override;

private:
    std::shared_ptr<const TrtEngine> engine_;
    TrtEngine::Context context_;
    void *stream_;
};

// "float16", "int64", ... and the element size, for a TensorRT data type.
IoTensor io_tensor(const std::string &name, bool input, nvinfer1::DataType type);

}  // namespace eclipse::core
