// One generic backend interface: the pipeline never knows which backend runs a graph.
//
//   Backend::preflight(bundle)                         before any component loads (a device
//                                                      backend checks every engine against
//                                                      this GPU first: engine_problems)
//   Backend::load(bundle, component)  -> Session      immutable once loaded, shared by every
//                                                      eclipse_state of a context
//   Session::new_state()              -> SessionState per-request resources (execution
//                                                      context, device buffers, stream, CUDA
//                                                      graph); nullptr when none are needed
//   Session::run(state, inputs, outputs)               outputs are allocated by the caller with
//                                                      the shapes the graph's spec implies
//   Backend::denoise(unet, state, call)                optional device-resident UNet loop:
//                                                      guidance + scheduler step on the device
//                                                      from per-step eclipse_step_coefficients;
//                                                      has_device_loop() says it is there
//   Backend::denoise_unclip(unets, call)               the same for Karlo's loops (unclip_step)
//   Backend::stage_done(session, state)                after each stage (as the Python
//                                                      pipeline's hook): a low-memory device
//                                                      backend frees that stage's engine here
#pragma once

#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "core/bundle.hpp"
#include "core/common.hpp"

namespace eclipse::core {

struct UnclipLoopCall;  // backends/device_loop.hpp

class SessionState {
public:
    virtual ~SessionState() = default;
    // Warnings for the caller's result (e.g. a CUDA-graph capture that fell back to plain
    // enqueues); the pipeline moves them into the result after each stage, as the Python
    // pipeline drains its backend's warnings into the Generation.
    std::vector<std::string> warnings;
};

class Session {
public:
    virtual ~Session() = default;
    virtual std::unique_ptr<SessionState> new_state() const { return nullptr; }
    // Must be safe to call from several threads at once with different states.
    virtual void run(SessionState *state, const std::vector<TensorView> &inputs,
                     std::vector<TensorView> &outputs) const = 0;
};

// What a backend needs to load one component: its name and its verified files.
struct ComponentFiles {
    std::string name;                 // text_encoder, prior, unet, movq
    std::filesystem::path graph;      // the ONNX graph (inside the bundle, listed, verified)
    const nlohmann::json *engine;     // the manifest's engines[name] entry, or nullptr
};

class Backend {
public:
    virtual ~Backend() = default;
    virtual std::string name() const = 0;
    virtual void preflight(const Bundle &bundle) const { (void)bundle; }
    virtual std::unique_ptr<Session> load(const Bundle &bundle, const ComponentFiles &component) const = 0;

    virtual void stage_done(const Session &session, SessionState *state) const { (void)session, (void)state; }

    virtual bool has_device_loop() const { return false; }
    // The whole UNet loop; returns false when the progress callback cancelled it.
    virtual bool denoise(const Session &unet, SessionState *state, const eclipse_denoise_call &call) const {
        (void)unet, (void)state, (void)call;
        throw Error(ECLIPSE_ERR_INTERNAL, name() + " has no device loop");
    }

    // Karlo's decoder / super-resolution loops on the device (backends/device_loop.hpp
    // UnclipLoopCall): the UNets in order (the first for every step but the last) with their
    // request states. Internal: custom backends of the C API loop on the host for Karlo.
    virtual bool has_unclip_loop() const { return false; }
    virtual bool denoise_unclip(const std::vector<std::pair<const Session *, SessionState *>> &unets,
                                const UnclipLoopCall &call) const {
        (void)unets, (void)call;
        throw Error(ECLIPSE_ERR_INTERNAL, name() + " has no unCLIP device loop");
    }
};

std::shared_ptr<Backend> make_custom_backend(const eclipse_custom_backend &table);
// nullptr and a message when ONNX Runtime was not built in
std::shared_ptr<Backend> make_onnxruntime_backend(const eclipse_onnxruntime_options &options);
bool onnxruntime_built_in();
// nullptr-free: throws Error(ECLIPSE_ERR_UNSUPPORTED) when the TensorRT backend was not built in
std::shared_ptr<Backend> make_tensorrt_backend(const eclipse_tensorrt_options &options);
const char *tensorrt_flavour_built_in();  // "tensorrt", "tensorrt-rtx" or nullptr

}  // namespace eclipse::core
