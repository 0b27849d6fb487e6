// The device side of the TensorRT backend, written against two small interfaces so that its
// logic (grow-only buffers, binding, CUDA-graph capture/replay and its fallback, the
// device-resident UNet loop, the NaN flag, progress and cancel) is one piece of code with one
// meaning, whatever runs it:
//   DeviceStream   one CUDA stream of one device (real: cuda_stream.cpp over the CUDA driver;
//                  tests: a host-memory fake that checks logic only, never the CUDA API)
//   EngineContext  one execution context of an engine (real: TensorRT's IExecutionContext)
// The statement is runtime/backends/tensorrt.py's (TrtSession.bind/enqueue/run and
// TensorRTBackend.denoise); docs/decisions.md has the reasons.
#pragma once

#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "core/common.hpp"
#include "core/unclip_scheduler.hpp"

namespace eclipse::core {

using DevicePtr = uint64_t;

struct GuidedStepArgs {  // runtime/backends/kernels/guided_step.cu's parameters
    DevicePtr pred = 0, latents = 0, noise = 0, sample_out = 0;
    int64_t n = 0;
    int cfg = 0;
    float scale = 1.0f;
    eclipse_step_coefficients k{};
    DevicePtr bad_step = 0;
    uint32_t step = 0;
};

struct UnclipStepArgs {  // kernels/guided_step.cu unclip_step's parameters (Karlo's loops)
    DevicePtr pred = 0, latents = 0, noise = 0, sample_out = 0;
    int64_t n = 0, plane = 0;  // latent elements, H * W
    int channels = 0, pred_channels = 0, cfg = 0;
    float scale = 1.0f;
    UnclipStepTerms k{};
    DevicePtr bad_step = 0;
    uint32_t step = 0;
};

class DeviceStream {
public:
    virtual ~DeviceStream() = default;
    virtual DevicePtr malloc(size_t bytes) = 0;
    virtual void free(DevicePtr p) noexcept = 0;
    // Copies queued on the stream; host buffers must stay alive until synchronize().
    virtual void upload(DevicePtr dst, const void *src, size_t bytes) = 0;
    virtual void download(void *dst, DevicePtr src, size_t bytes) = 0;
    virtual void copy(DevicePtr dst, DevicePtr src, size_t bytes) = 0;
    virtual void fill_u32(DevicePtr dst, uint32_t value, size_t count) = 0;
    virtual void synchronize() = 0;
    // Thread-local capture of the work queued in between; end_capture returns an executable
    // graph and leaves capture mode even when it throws.
    virtual void begin_capture() = 0;
    virtual void *end_capture() = 0;
    virtual void launch_graph(void *graph) = 0;
    virtual void destroy_graph(void *graph) noexcept = 0;
    virtual void *create_event() = 0;
    virtual void record_event(void *event) = 0;
    virtual void wait_event(void *event) = 0;  // the host waits until the device got there
    virtual void destroy_event(void *event) noexcept = 0;
    virtual void guided_step(const GuidedStepArgs &args) = 0;
    virtual void unclip_step(const UnclipStepArgs &args) {
        (void)args;
        throw Error(ECLIPSE_ERR_INTERNAL, "this device stream has no unclip_step kernel");
    }
};

enum class IoType { Float32, Int32, Other };

struct IoTensor {
    std::string name;
    bool input = false;
    IoType type = IoType::Other;
    size_t element_bytes = 4;
    std::string type_name;  // as the engine spells it, for messages
};

class EngineContext {
public:
    virtual ~EngineContext() = default;
    virtual const std::vector<IoTensor> &tensors() const = 0;
    virtual bool set_input_shape(const std::string &name, const std::vector<int64_t> &shape) = 0;
    virtual std::vector<int64_t> shape(const std::string &name) const = 0;  // after every input shape is set
    virtual void set_address(const std::string &name, DevicePtr p) = 0;
    virtual bool enqueue() = 0;  // on the state's stream
};

// Device memory that grows, never shrinks: its address (which the engine and a captured CUDA
// graph hold) changes only when a larger shape needs it to.
class DeviceBuffer {
public:
    explicit DeviceBuffer(DeviceStream &stream) : stream_(&stream) {}
    ~DeviceBuffer() { stream_->free(ptr_); }
    DeviceBuffer(const DeviceBuffer &) = delete;
    DeviceBuffer &operator=(const DeviceBuffer &) = delete;
    bool ensure(size_t bytes);  // true when the address changed
    DevicePtr ptr() const { return ptr_; }
    size_t capacity() const { return capacity_; }

private:
    DeviceStream *stream_;
    DevicePtr ptr_ = 0;
    size_t capacity_ = 0;
};

struct BindingOptions {
    std::string component;          // "unet", for messages
    bool cuda_graphs = true;        // capture the enqueue and replay it (TensorRT flavour)
    std::string profile_hint;       // the engine's profile as the manifest gives it (messages)
    std::string rebuild_hint;       // "rebuild on this machine: eclipse-export ..."
    std::vector<std::string> *warnings = nullptr;  // where a capture fallback is reported (besides the log)
};

// The bindings of one execution context: input shapes, grow-only buffers and their addresses,
// and the CUDA graph captured for them.
class Binding {
public:
    Binding(DeviceStream &stream, EngineContext &context, BindingOptions options);
    ~Binding();
    Binding(const Binding &) = delete;
    Binding &operator=(const Binding &) = delete;

    // Input shapes set, every tensor's buffer sized and its address set; true when anything
    // changed (a captured graph is then stale and dropped).
    bool bind(const std::map<std::string, std::vector<int64_t>> &input_shapes);
    DevicePtr ptr(const std::string &name) const;
    const std::vector<int64_t> &shape(const std::string &name) const;
    const IoTensor &tensor(const std::string &name) const;

    // One inference. use_graph: the UNet step. TensorRT: one plain enqueue, then the enqueue is
    // captured (the captured run is not executed: the plain one did this step's work) and
    // replayed on the next calls; a failed capture falls back to plain enqueues with a warning.
    void enqueue(bool use_graph);
    // The generic Session::run: host inputs in, host outputs out (sizes checked).
    void run(const std::vector<TensorView> &inputs, std::vector<TensorView> &outputs);

    struct Counters {
        int plain_enqueues = 0, captures = 0, graph_launches = 0, rebinds = 0;
    };
    const Counters &counters() const { return counters_; }
    bool capture_failed() const { return capture_failed_; }

private:
    void drop_graph();
    void *capture();

    DeviceStream &stream_;
    EngineContext &context_;
    BindingOptions options_;
    std::map<std::string, std::vector<int64_t>> shapes_;
    std::map<std::string, std::unique_ptr<DeviceBuffer>> buffers_;
    void *graph_ = nullptr;
    bool capture_failed_ = false;
    Counters counters_;
};

// Who keeps a loaded engine resident. Normal mode: from load until the context is freed.
// Low-memory mode: only while some request state uses it (acquired when a stage starts, dropped
// in stage_done), so at most one engine per generation is resident; states using it at the same
// time share one load. Thread-safe.
template <class Engine>
class EngineHolder {
public:
    using Loader = std::function<std::shared_ptr<const Engine>()>;
    EngineHolder(Loader load, bool low_memory) : load_(std::move(load)) {
        if (!low_memory) held_ = acquire();
    }
    // Lets go of the engine held since construction (normal mode); states using it keep it alive.
    void drop() { held_.reset(); }
    std::shared_ptr<const Engine> acquire() const {
        std::lock_guard<std::mutex> lock(mutex_);
        if (auto live = current_.lock()) return live;
        auto engine = load_();
        current_ = engine;
        return engine;
    }

private:
    Loader load_;
    mutable std::mutex mutex_;
    mutable std::weak_ptr<const Engine> current_;
    std::shared_ptr<const Engine> held_;
};

// The loop's own device buffers (per request state, grow-only like the bindings).
struct LoopBuffers {
    explicit LoopBuffers(DeviceStream &s) : latents(s), timesteps(s), noise(s), bad_step(s) {}
    DeviceBuffer latents, timesteps, noise, bad_step;
};

// The whole UNet loop on the device: inputs uploaded once, then per step only a 4-byte
// timestep copy, the UNet enqueue (graph replay) and the fused guidance + step kernel; the
// final latents and the NaN flag come back once. Returns false when the progress callback
// cancelled; throws Error naming the first step that produced NaN/Inf.
bool denoise_on_device(DeviceStream &stream, Binding &unet, LoopBuffers &buffers, const eclipse_denoise_call &call);

// Karlo's loops (chain_karlo.cpp): the decoder (one UNet, learned variance, guidance on the noise
// channels) or the super-resolution (super_res_first for every step but the last, then
// super_res_last; fixed variance). Internal to the library: the C API's custom backends loop on
// the host for Karlo.
struct UnclipLoopCall {
    const float *latents = nullptr;  // (B, C, H, W), already times init_noise_sigma
    int64_t latent_shape[4] = {0, 0, 0, 0};
    std::vector<TensorView> constants;  // the UNets' other inputs, uploaded once per UNet
    std::vector<float> timesteps;       // the UNet's timestep input per step
    std::vector<UnclipStepTerms> terms;  // per step
    bool cfg = false;
    float guidance_scale = 1.0f;
    const float *step_noise = nullptr;  // (steps, B, C, H, W)
    float *out_latents = nullptr;
    std::function<bool(int32_t done, int32_t steps)> progress;  // false: cancel
};

// One UNet of the loop: its stream and its binding (bound on first use: low-memory mode loads
// the last UNet's engine only after the first one's is freed).
struct UnclipUnet {
    DeviceStream *stream = nullptr;
    std::function<Binding &()> binding;
    std::string name;
};

// Per step on the device: a 4-byte timestep copy, the UNet (graph replay) and unclip_step, whose
// scalars are launch arguments. At the switch to the last UNet, `before_switch` runs (low-memory:
// frees the first engine) after the first stream drained; the loop buffers (of the first UNet's
// stream) stay. Returns false when progress cancelled; throws naming the first NaN/Inf step.
bool denoise_unclip_on_device(LoopBuffers &buffers, const std::vector<UnclipUnet> &unets, const UnclipLoopCall &call,
                              const std::function<void()> &before_switch);

}  // namespace eclipse::core
