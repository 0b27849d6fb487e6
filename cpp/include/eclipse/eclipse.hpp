// Header-only C++ wrapper over eclipse.h: RAII handles and exceptions.
//
//   eclipse::Backend backend = eclipse::Backend::onnxruntime();
//   eclipse::Context ctx(eclipse::Bundle("engines/tiny-onnx"), backend);
//   eclipse::State state(ctx);
//   eclipse::Params p;  p.seed = 7;
//   state.generate("a red cube on a blue sphere", p).save_png("out.png");
//   // λ-ECLIPSE bundle: p.subjects = {{eclipse::Image::file("dog.png"), "dog"}};
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <stdexcept>
#include <string>
#include <vector>

#include "eclipse.h"

namespace eclipse {

class Error : public std::runtime_error {
public:
    Error(eclipse_status status, const std::string &message) : std::runtime_error(message), status_(status) {}
    eclipse_status status() const { return status_; }

private:
    eclipse_status status_;
};

inline void check(eclipse_status status) {
    if (status != ECLIPSE_OK) throw Error(status, eclipse_last_error());
}

namespace detail {
template <class T, void (*Free)(T *)>
struct Deleter {
    void operator()(T *p) const { Free(p); }
};
template <class T, void (*Free)(T *)>
using Handle = std::unique_ptr<T, Deleter<T, Free>>;
}  // namespace detail

class Backend {
public:
    // library_path: the libonnxruntime to open ("": the one named at build time, else the system's)
    static Backend onnxruntime(const std::string &providers = "cpu", int threads = 0, int device_id = 0,
                               const std::string &library_path = "") {
        eclipse_onnxruntime_options o = eclipse_onnxruntime_default_options();
        o.providers = providers.c_str();
        o.intra_op_threads = threads;
        o.device_id = device_id;
        o.library_path = library_path.empty() ? nullptr : library_path.c_str();
        eclipse_backend *b = nullptr;
        check(eclipse_backend_onnxruntime_create(&o, &b));
        return Backend(b);
    }
    // TensorRT or TensorRT-RTX, as this library was built (eclipse_tensorrt_flavour())
    static Backend tensorrt(bool low_memory = false, bool cuda_graphs = true, int device_id = 0,
                            const eclipse_tensorrt_options *base = nullptr) {
        eclipse_tensorrt_options o = base ? *base : eclipse_tensorrt_default_options();
        o.low_memory = low_memory ? 1 : 0;
        o.cuda_graphs = cuda_graphs ? 1 : 0;
        o.device_id = device_id;
        eclipse_backend *b = nullptr;
        check(eclipse_backend_tensorrt_create(&o, &b));
        return Backend(b);
    }
    static Backend custom(const eclipse_custom_backend &table) {
        eclipse_backend *b = nullptr;
        check(eclipse_backend_custom_create(&table, &b));
        return Backend(b);
    }
    eclipse_backend *get() const { return handle_.get(); }

private:
    explicit Backend(eclipse_backend *b) : handle_(b) {}
    detail::Handle<eclipse_backend, eclipse_backend_free> handle_;
};

class Bundle {
public:
    explicit Bundle(const std::string &path, bool verify_hashes = true) {
        eclipse_bundle *b = nullptr;
        check(eclipse_bundle_open(path.c_str(), verify_hashes ? 1 : 0, &b));
        handle_.reset(b);
    }
    int64_t dim(const std::string &name) const { return eclipse_bundle_dim(handle_.get(), name.c_str()); }
    std::vector<int32_t> tokenize(const std::string &text, bool *truncated = nullptr) const {
        std::vector<int32_t> ids(static_cast<size_t>(dim("T")));
        int32_t cut = 0;
        check(eclipse_tokenize(handle_.get(), text.c_str(), ids.data(), nullptr, static_cast<int32_t>(ids.size()), &cut));
        if (truncated) *truncated = cut != 0;
        return ids;
    }
    const eclipse_bundle *get() const { return handle_.get(); }

private:
    detail::Handle<eclipse_bundle, eclipse_bundle_free> handle_;
};

class Context {
public:
    Context(const Bundle &bundle, const Backend &backend) {
        eclipse_context *c = nullptr;
        check(eclipse_context_create(bundle.get(), backend.get(), &c));
        handle_.reset(c);
    }
    eclipse_context *get() const { return handle_.get(); }

private:
    detail::Handle<eclipse_context, eclipse_context_free> handle_;
};

// A λ-ECLIPSE subject or control image (eclipse_image): a PNG file, or RGB8/RGBA8 pixels the
// caller keeps alive until generate() returns.
struct Image {
    std::string path;
    const uint8_t *pixels = nullptr;
    int32_t width = 0, height = 0, channels = 3;
    size_t stride = 0;  // 0: packed rows
    static Image file(const std::string &path) {
        Image i;
        i.path = path;
        return i;
    }
    static Image rgb8(const uint8_t *pixels, int32_t width, int32_t height, size_t stride = 0, int32_t channels = 3) {
        Image i;
        i.pixels = pixels, i.width = width, i.height = height, i.stride = stride, i.channels = channels;
        return i;
    }
    eclipse_image c() const { return {path.empty() ? nullptr : path.c_str(), pixels, width, height, channels, stride}; }
};

struct Subject {
    Image image;
    std::string keyword;  // the prompt word the image stands for
};

// An injected noise by name ("prior", "latents", "steps"; Karlo also "sr_latents", "sr_steps"): see eclipse_noise
struct Noise {
    std::string name;
    const float *data = nullptr;
    size_t count = 0;
};

struct Params {
    std::optional<std::string> negative_prompt;  // nullopt: the bundle's zero-image embedding
    int32_t width = 512, height = 512, steps = 50;
    double guidance_scale = 4.0;
    uint64_t seed = 0;
    eclipse_scheduler scheduler = ECLIPSE_SCHEDULER_BUNDLE;
    std::function<bool(int step, int steps)> progress;  // return false to cancel
    std::vector<Subject> subjects;        // λ-ECLIPSE bundles (at least one there; refused elsewhere)
    std::optional<Image> control_image;   // λ-ECLIPSE: an edge map; nullopt: the zero-image embedding
    std::vector<Noise> noises;            // injected; the rest is drawn from the seed
};

// The bundle family's defaults (Karlo: the bundle's image size, 25 steps, guidance 8).
inline Params default_params(const Bundle &bundle) {
    const eclipse_params c = eclipse_bundle_default_params(bundle.get());
    Params p;
    p.width = c.width, p.height = c.height, p.steps = c.steps, p.guidance_scale = c.guidance_scale;
    return p;
}

class Result {
public:
    explicit Result(eclipse_result *r) : handle_(r) {}
    int32_t width() const { return eclipse_result_width(handle_.get()); }
    int32_t height() const { return eclipse_result_height(handle_.get()); }
    const uint8_t *pixels() const { return eclipse_result_pixels(handle_.get()); }
    double timing(const std::string &stage) const { return eclipse_result_timing(handle_.get(), stage.c_str()); }
    std::vector<std::string> warnings() const {
        std::vector<std::string> out;
        for (size_t i = 0; i < eclipse_result_warning_count(handle_.get()); ++i) out.emplace_back(eclipse_result_warning(handle_.get(), i));
        return out;
    }
    void save_png(const std::string &path) const { check(eclipse_result_save_png(handle_.get(), path.c_str())); }

private:
    detail::Handle<eclipse_result, eclipse_result_free> handle_;
};

// Per-request state: one generation at a time; use one State per thread.
class State {
public:
    explicit State(const Context &context) {
        eclipse_state *s = nullptr;
        check(eclipse_state_create(context.get(), &s));
        handle_.reset(s);
    }
    Result generate(const std::string &prompt, const Params &p = Params()) {
        eclipse_params c = eclipse_default_params();
        c.negative_prompt = p.negative_prompt ? p.negative_prompt->c_str() : nullptr;
        c.width = p.width, c.height = p.height, c.steps = p.steps;
        c.guidance_scale = p.guidance_scale;
        c.seed = p.seed;
        c.scheduler = p.scheduler;
        if (p.progress) {
            c.progress = [](int32_t step, int32_t steps, void *data) {
                try {  // no exception may cross the C library: one that escapes here cancels
                    return (*static_cast<const std::function<bool(int, int)> *>(data))(step, steps) ? 0 : 1;
                } catch (...) {
                    return 1;
                }
            };
            c.progress_data = const_cast<std::function<bool(int, int)> *>(&p.progress);
        }
        std::vector<eclipse_subject> subjects;
        for (const Subject &sub : p.subjects) subjects.push_back({sub.image.c(), sub.keyword.c_str()});
        c.subjects = subjects.data(), c.subject_count = subjects.size();
        eclipse_image control{};
        if (p.control_image) {
            control = p.control_image->c();
            c.control_image = &control;
        }
        std::vector<eclipse_noise> noises;
        for (const Noise &n : p.noises) noises.push_back({n.name.c_str(), n.data, n.count});
        c.noises = noises.data(), c.noise_count = noises.size();
        eclipse_result *r = nullptr;
        check(eclipse_generate(handle_.get(), prompt.c_str(), &c, &r));
        return Result(r);
    }

private:
    detail::Handle<eclipse_state, eclipse_state_free> handle_;
};

}  // namespace eclipse
