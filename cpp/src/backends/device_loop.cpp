#include "backends/device_loop.hpp"

#include <algorithm>
#include <map>

namespace eclipse::core {
namespace {

std::string shape_text(const std::vector<int64_t> &shape) {
    std::string s = "(";
    for (size_t i = 0; i < shape.size(); ++i) s += (i ? ", " : "") + std::to_string(shape[i]);
    return s + (shape.size() == 1 ? ",)" : ")");
}

// Two events recycled over the steps (how far the device has got, without draining the stream).
class Events {
public:
    Events(DeviceStream &s, bool wanted) : stream_(s) {
        if (!wanted) return;
        try {
            for (auto &e : events_) e = stream_.create_event();
        } catch (...) {  // a constructor that throws runs no destructor: free the first event here
            destroy();
            throw;
        }
    }
    ~Events() { destroy(); }
    void destroy() noexcept {
        for (auto *&e : events_) {
            if (e) stream_.destroy_event(e);
            e = nullptr;
        }
    }
    void *operator[](size_t i) const { return events_[i % 2]; }
    bool active() const { return events_[0] != nullptr; }

private:
    DeviceStream &stream_;
    void *events_[2] = {nullptr, nullptr};
};

}  // namespace

bool DeviceBuffer::ensure(size_t bytes) {
    if (bytes <= capacity_) return false;
    stream_->free(ptr_);
    ptr_ = 0, capacity_ = 0;
    ptr_ = stream_->malloc(std::max<size_t>(bytes, 1));
    capacity_ = bytes;
    return true;
}

Binding::Binding(DeviceStream &stream, EngineContext &context, BindingOptions options)
    : stream_(stream), context_(context), options_(std::move(options)) {}

Binding::~Binding() { drop_graph(); }

void Binding::drop_graph() {
    if (graph_) stream_.destroy_graph(graph_);
    graph_ = nullptr;
}

const IoTensor &Binding::tensor(const std::string &name) const {
    for (const auto &t : context_.tensors()) {
        if (t.name == name) return t;
    }
    backend_error(options_.component + ": the engine has no tensor '" + name + "'; " + options_.rebuild_hint);
}

bool Binding::bind(const std::map<std::string, std::vector<int64_t>> &input_shapes) {
    bool changed = false;
    for (const auto &[name, shape] : input_shapes) {
        if (!tensor(name).input) backend_error(options_.component + "." + name + " is not an input of the engine");
        auto it = shapes_.find(name);
        if (it != shapes_.end() && it->second == shape) continue;
        if (!context_.set_input_shape(name, shape))
            backend_error(options_.component + "." + name + ": shape " + shape_text(shape) +
                          " is outside the engine's profile" + (options_.profile_hint.empty() ? "" : " " + options_.profile_hint) +
                          "; rebuild with a wider profile or --static");
        shapes_[name] = shape;
        changed = true;
    }
    const auto &tensors = context_.tensors();
    const bool all_bound = std::all_of(tensors.begin(), tensors.end(), [&](const IoTensor &t) { return buffers_.count(t.name) != 0; });
    if (!changed && all_bound) return false;
    for (const auto &t : tensors) {
        if (!t.input) shapes_[t.name] = context_.shape(t.name);
        auto it = shapes_.find(t.name);
        if (it == shapes_.end()) backend_error(options_.component + ": no shape given for the engine input " + t.name);
        const auto &shape = it->second;
        if (std::any_of(shape.begin(), shape.end(), [](int64_t d) { return d < 0; }))
            backend_error(options_.component + "." + t.name + ": the engine cannot give a shape for these inputs " + shape_text(shape));
        auto &buffer = buffers_[t.name];
        if (!buffer) buffer = std::make_unique<DeviceBuffer>(stream_);
        buffer->ensure(static_cast<size_t>(element_count(shape)) * t.element_bytes);
        context_.set_address(t.name, buffer->ptr());
    }
    drop_graph();
    ++counters_.rebinds;
    return true;
}

DevicePtr Binding::ptr(const std::string &name) const {
    auto it = buffers_.find(name);
    if (it == buffers_.end()) backend_error(options_.component + "." + name + " is not bound");
    return it->second->ptr();
}

const std::vector<int64_t> &Binding::shape(const std::string &name) const {
    auto it = shapes_.find(name);
    if (it == shapes_.end()) backend_error(options_.component + "." + name + " is not bound");
    return it->second;
}

void Binding::enqueue(bool use_graph) {
    if (!use_graph || !options_.cuda_graphs || capture_failed_) {
        ++counters_.plain_enqueues;
        if (!context_.enqueue()) backend_error(options_.component + ": TensorRT enqueue failed (see its messages above)");
        return;
    }
    if (graph_ == nullptr) {
        ++counters_.plain_enqueues;
        if (!context_.enqueue()) backend_error(options_.component + ": TensorRT enqueue failed (see its messages above)");
        stream_.synchronize();
        graph_ = capture();
        return;
    }
    ++counters_.graph_launches;
    stream_.launch_graph(graph_);
}

void *Binding::capture() {
    auto failed = [&](const std::string &why) -> void * {
        capture_failed_ = true;
        const std::string message = options_.component + ": CUDA-graph capture failed (" + why + "); running without CUDA graphs";
        log(ECLIPSE_LOG_WARN, message);
        if (options_.warnings) options_.warnings->push_back(message);
        return nullptr;
    };
    try {
        stream_.begin_capture();
    } catch (const Error &e) {
        return failed(e.what());
    }
    bool ok = false;
    try {
        ok = context_.enqueue();
    } catch (...) {
        try {  // leave capture mode, or the stream stays unusable
            stream_.destroy_graph(stream_.end_capture());
        } catch (const Error &) {
        }
        throw;
    }
    void *graph = nullptr;
    try {
        graph = stream_.end_capture();
    } catch (const Error &e) {
        return failed(e.what());
    }
    if (!ok) {
        stream_.destroy_graph(graph);
        return failed("the enqueue failed while capturing");
    }
    ++counters_.captures;
    return graph;
}

void Binding::run(const std::vector<TensorView> &inputs, std::vector<TensorView> &outputs) {
    std::map<std::string, std::vector<int64_t>> shapes;
    for (const auto &t : inputs) shapes[t.name] = t.shape;
    bind(shapes);
    auto check_type = [&](const TensorView &v) {
        const IoTensor &t = tensor(v.name);
        const IoType want = v.dtype == DType::Float32 ? IoType::Float32 : IoType::Int32;
        if (t.type != want)
            backend_error(options_.component + "." + v.name + " is " + t.type_name + " in the engine, " +
                          (want == IoType::Float32 ? "float32" : "int32") + " in the bundle's graph; " + options_.rebuild_hint);
    };
    for (const auto &t : inputs) {
        check_type(t);
        stream_.upload(ptr(t.name), t.data, t.bytes());
    }
    enqueue(false);
    for (auto &t : outputs) {
        check_type(t);
        if (element_count(shape(t.name)) != t.count())
            backend_error(options_.component + "." + t.name + ": the engine gives " + shape_text(shape(t.name)) +
                          ", the bundle's graph " + shape_text(t.shape) + "; " + options_.rebuild_hint);
        stream_.download(t.data, ptr(t.name), t.bytes());
    }
    stream_.synchronize();
}

bool denoise_on_device(DeviceStream &stream, Binding &unet, LoopBuffers &buffers, const eclipse_denoise_call &call) {
    const int64_t *ls = call.latent_shape;
    const int64_t n = ls[0] * ls[1] * ls[2] * ls[3];
    const int64_t rows = call.cfg ? 2 * ls[0] : ls[0];
    const size_t steps = static_cast<size_t>(call.steps);
    unet.bind({{"sample", {rows, ls[1], ls[2], ls[3]}},
               {"timestep", {1}},
               {"image_embeds", {call.embeds_shape[0], call.embeds_shape[1]}}});
    for (const char *name : {"sample", "timestep", "image_embeds", "noise_pred"}) {
        if (unet.tensor(name).type != IoType::Float32)
            backend_error(std::string("the device loop expects float32 UNet I/O, the engine's ") + name + " is " +
                          unet.tensor(name).type_name + " (the FP16 graphs keep float32 I/O: re-export the bundle)");
    }
    if (unet.shape("noise_pred") != unet.shape("sample"))
        backend_error("the UNet engine gives noise_pred of another shape than its sample input");
    const size_t bytes = static_cast<size_t>(n) * 4;
    buffers.latents.ensure(bytes);
    buffers.timesteps.ensure(steps * 4);
    buffers.noise.ensure(call.step_noise ? steps * bytes : 4);
    buffers.bad_step.ensure(4);
    stream.upload(buffers.latents.ptr(), call.latents, bytes);
    stream.upload(buffers.timesteps.ptr(), call.timesteps, steps * 4);
    if (call.step_noise) stream.upload(buffers.noise.ptr(), call.step_noise, steps * bytes);
    stream.upload(unet.ptr("image_embeds"), call.image_embeds,
                  static_cast<size_t>(call.embeds_shape[0] * call.embeds_shape[1]) * 4);
    stream.fill_u32(buffers.bad_step.ptr(), 0, 1);
    // bound above; nothing in the loop rebinds, so the addresses are looked up once
    const DevicePtr sample = unet.ptr("sample"), timestep = unet.ptr("timestep"), noise_pred = unet.ptr("noise_pred");
    stream.copy(sample, buffers.latents.ptr(), bytes);
    if (call.cfg) stream.copy(sample + bytes, buffers.latents.ptr(), bytes);

    // progress reports work done, not work queued, without draining the stream each step: an
    // event after each step, and the host waits for the previous step's event only, so one step
    // is always queued ahead and the GPU never idles on the host
    Events events(stream, call.progress != nullptr);
    bool cancelled = false;
    for (size_t i = 0; i < steps && !cancelled; ++i) {
        stream.copy(timestep, buffers.timesteps.ptr() + 4 * i, 4);
        unet.enqueue(true);
        const eclipse_step_coefficients &k = call.coefficients[i];
        GuidedStepArgs a;
        a.pred = noise_pred;
        a.latents = buffers.latents.ptr();
        a.noise = call.step_noise && k.std != 0.0f ? buffers.noise.ptr() + i * bytes : 0;
        a.sample_out = i + 1 == steps ? 0 : sample;  // the last step feeds no further UNet call
        a.n = n;
        a.cfg = call.cfg;
        a.scale = call.cfg ? call.guidance_scale : 1.0f;
        a.k = k;
        a.bad_step = buffers.bad_step.ptr();
        a.step = static_cast<uint32_t>(i);
        stream.guided_step(a);
        if (events.active()) {
            stream.record_event(events[i]);
            if (i > 0) {
                stream.wait_event(events[i - 1]);
                cancelled = call.progress(static_cast<int32_t>(i), call.steps, call.progress_data) != 0;
            }
        }
    }
    uint32_t bad = 0;
    stream.download(call.out_latents, buffers.latents.ptr(), bytes);
    stream.download(&bad, buffers.bad_step.ptr(), 4);
    stream.synchronize();
    if (cancelled) return false;
    if (bad != 0)
        backend_error("the UNet loop produced NaN/Inf latents at step " + std::to_string(bad) + " of " + std::to_string(steps) +
                      " (FP16 overflow? compare with the FP32 bundle or eclipse-generate --compare-reference)");
    return !(call.progress && call.progress(call.steps, call.steps, call.progress_data) != 0);
}

bool denoise_unclip_on_device(LoopBuffers &buffers, const std::vector<UnclipUnet> &unets, const UnclipLoopCall &call,
                              const std::function<void()> &before_switch) {
    const int64_t *ls = call.latent_shape;
    const int64_t n = ls[0] * ls[1] * ls[2] * ls[3], rows = call.cfg ? 2 * ls[0] : ls[0];
    const size_t steps = call.timesteps.size();
    if (unets.empty() || unets.size() > 2 || steps < 2 || call.terms.size() != steps)
        throw Error(ECLIPSE_ERR_INTERNAL, "the unCLIP device loop needs 1 or 2 UNets and a term per step");
    const int pred_channels = static_cast<int>(call.terms[0].learned ? 2 * ls[1] : ls[1]);
    const size_t bytes = static_cast<size_t>(n) * 4;
    const std::string &name = unets[0].name;
    DeviceStream *stream = unets[0].stream;
    buffers.latents.ensure(bytes);
    buffers.timesteps.ensure(steps * 4);
    buffers.noise.ensure(steps * bytes);
    buffers.bad_step.ensure(4);
    stream->upload(buffers.latents.ptr(), call.latents, bytes);
    stream->upload(buffers.timesteps.ptr(), call.timesteps.data(), steps * 4);
    stream->upload(buffers.noise.ptr(), call.step_noise, steps * bytes);
    stream->fill_u32(buffers.bad_step.ptr(), 0, 1);

    // bind one UNet, upload its constant inputs, fill its sample from the latents
    auto start = [&](const UnclipUnet &u) -> Binding & {
        Binding &b = u.binding();
        std::map<std::string, std::vector<int64_t>> shapes{{"sample", {rows, ls[1], ls[2], ls[3]}}, {"timestep", {1}}};
        for (const auto &c : call.constants) shapes[c.name] = c.shape;
        b.bind(shapes);
        for (const char *t : {"sample", "timestep", "noise_pred"}) {
            if (b.tensor(t).type != IoType::Float32)
                backend_error("the device loop expects float32 UNet I/O, " + u.name + "'s " + t + " is " +
                              b.tensor(t).type_name + " (the FP16 graphs keep float32 I/O: re-export the bundle)");
        }
        for (const auto &c : call.constants) {
            if (b.tensor(c.name).type != (c.dtype == DType::Float32 ? IoType::Float32 : IoType::Int32))
                backend_error(u.name + "." + c.name + " is " + b.tensor(c.name).type_name + " in the engine, not the bundle graph's type");
            u.stream->upload(b.ptr(c.name), c.data, c.bytes());
        }
        const std::vector<int64_t> want{rows, pred_channels, ls[2], ls[3]};
        if (b.shape("noise_pred") != want)
            backend_error(u.name + " gives noise_pred of shape " + shape_text(b.shape("noise_pred")) + ", the unCLIP loop needs " +
                          shape_text(want));
        u.stream->copy(b.ptr("sample"), buffers.latents.ptr(), bytes);
        if (call.cfg) u.stream->copy(b.ptr("sample") + bytes, buffers.latents.ptr(), bytes);
        return b;
    };

    Binding *unet = &start(unets[0]);
    const bool switches = unets.size() == 2;
    Events events(*stream, static_cast<bool>(call.progress));  // as denoise_on_device: work done, one step queued ahead
    bool cancelled = false;
    for (size_t i = 0; i < steps && !cancelled; ++i) {
        const bool last = i + 1 == steps;
        if (last && switches) {
            stream->synchronize();  // the other stream reads what this one wrote
            if (call.progress && !call.progress(static_cast<int32_t>(i), static_cast<int32_t>(steps))) {
                cancelled = true;
                break;
            }
            if (before_switch) before_switch();
            stream = unets[1].stream;
            unet = &start(unets[1]);
        }
        stream->copy(unet->ptr("timestep"), buffers.timesteps.ptr() + 4 * i, 4);
        unet->enqueue(!(last && switches));  // a UNet run once is not captured
        const UnclipStepTerms &k = call.terms[i];
        UnclipStepArgs a;
        a.pred = unet->ptr("noise_pred");
        a.latents = buffers.latents.ptr();
        a.noise = k.noise ? buffers.noise.ptr() + i * bytes : 0;
        // the next UNet input, unless no step follows or the next one starts another UNet (start() fills it)
        a.sample_out = (i + 2 < steps || (i + 2 == steps && !switches)) ? unet->ptr("sample") : 0;
        a.n = n, a.plane = ls[2] * ls[3];
        a.channels = static_cast<int>(ls[1]), a.pred_channels = pred_channels;
        a.cfg = call.cfg ? 1 : 0;
        a.scale = call.cfg ? call.guidance_scale : 1.0f;
        a.k = k;
        a.bad_step = buffers.bad_step.ptr();
        a.step = static_cast<uint32_t>(i);
        stream->unclip_step(a);
        if (events.active() && !(last && switches)) {
            stream->record_event(events[i]);
            if (i > 0) {
                stream->wait_event(events[i - 1]);
                cancelled = !call.progress(static_cast<int32_t>(i), static_cast<int32_t>(steps));
            }
        }
    }
    uint32_t bad = 0;
    stream->download(call.out_latents, buffers.latents.ptr(), bytes);
    stream->download(&bad, buffers.bad_step.ptr(), 4);
    stream->synchronize();
    if (cancelled) return false;
    if (bad != 0)
        backend_error("the " + name + " loop produced NaN/Inf at step " + std::to_string(bad) + " of " + std::to_string(steps) +
                      " (FP16 overflow? compare with the FP32 bundle or eclipse-generate --compare-reference)");
    return !(call.progress && !call.progress(static_cast<int32_t>(steps), static_cast<int32_t>(steps)));
}

}  // namespace eclipse::core
