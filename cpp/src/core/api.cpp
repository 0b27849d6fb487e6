// The C API: handles over the C++ core, exceptions turned into status codes + a per-thread
// message, buffers owned by the library.
#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdio>
#include <cstddef>
#include <cstring>
#include <initializer_list>
#include <mutex>
#include <string>
#include <new>
#include <tuple>

#include "core/backend.hpp"
#include "core/chain_lambda.hpp"
#include "core/image_input.hpp"
#include "core/noise.hpp"
#include "core/pipeline.hpp"
#include "core/scheduler.hpp"

struct eclipse_backend {
    std::shared_ptr<eclipse::core::Backend> impl;
};
struct eclipse_bundle {
    std::shared_ptr<const eclipse::core::BundleData> impl;
};
struct eclipse_context {
    std::shared_ptr<const eclipse::core::Context> impl;
};
struct eclipse_state {
    eclipse::core::State impl;
};
struct eclipse_result {
    eclipse::core::Result impl;
};

namespace eclipse::core {
namespace {

thread_local std::string g_last_error;

void default_log(eclipse_log_level level, const char *message, void *) {
    if (level >= ECLIPSE_LOG_WARN) std::fprintf(stderr, "eclipse: %s: %s\n", level == ECLIPSE_LOG_WARN ? "warning" : "error", message);
}

std::mutex g_log_mutex;
eclipse_log_fn g_log_fn = default_log;
void *g_log_data = nullptr;

template <class F>
eclipse_status guarded(F &&body) {
    try {
        body();
        g_last_error.clear();
        return ECLIPSE_OK;
    } catch (const Error &e) {
        g_last_error = e.what();
        return e.status;
    } catch (const std::bad_alloc &) {
        g_last_error = "out of memory";
        return ECLIPSE_ERR_OUT_OF_MEMORY;
    } catch (const std::exception &e) {
        g_last_error = std::string("internal error: ") + e.what();
        return ECLIPSE_ERR_INTERNAL;
    }
}

// The sizes of every released layout of a struct (its struct_size as a caller built against that
// eclipse.h sets it). Any other value is refused: a size between two field boundaries would copy
// half a pointer (seen: struct_size 12 crashed in strlen / the backend constructor).
std::string released_list(std::initializer_list<size_t> sizes) {
    std::string out;
    for (size_t n : sizes) out += (out.empty() ? "" : ", ") + std::to_string(n);
    return out;
}

void check_struct_size(uint32_t given, std::initializer_list<size_t> released, const char *type, const char *init) {
    for (size_t n : released)
        if (given == n) return;
    throw Error(ECLIPSE_ERR_INVALID_ARGUMENT, std::string(type) + ".struct_size " + std::to_string(given) +
                                                  " is not the size of any released " + type + " (" +
                                                  released_list(released) + " bytes); set it with " + init);
}

// The caller's options over the defaults: a caller built against an older header passes its
// (smaller, released) struct, the fields it lacks keep the defaults.
template <class T>
T options_or_defaults(const T *given, T defaults, std::initializer_list<size_t> released, const char *type,
                      const char *init) {
    if (given) {
        check_struct_size(given->struct_size, released, type, init);
        std::memcpy(&defaults, given, given->struct_size);
    }
    return defaults;
}

// An enum read from the caller's memory is checked as the integer it is before it is used as the
// enum (an out-of-range enum value is undefined behaviour in C++; UBSan aborts on it)
template <class E>
int32_t raw_enum(const E &value) {
    static_assert(sizeof(E) == sizeof(int32_t), "C enums are int-sized");
    int32_t raw;
    std::memcpy(&raw, &value, sizeof raw);
    return raw;
}

template <class T>
void require(const T *p, const char *what) {
    if (p == nullptr) throw Error(ECLIPSE_ERR_INVALID_ARGUMENT, std::string(what) + " is NULL");
}

// The caller's image: decoded and checked now, before any graph runs (runtime/subjects.py
// load_image's rules and words; `what` names it as the Python runtime does)
Rgb8Image read_image(const eclipse_image &image, const std::string &field, const std::string &what) {
    if (image.path != nullptr) {
        if (image.pixels != nullptr)
            throw Error(ECLIPSE_ERR_INVALID_ARGUMENT, field + " has both a path and pixels: give one");
        return decode_png_file(image.path, what);
    }
    if (image.channels != 1 && image.channels != 3 && image.channels != 4)
        throw Error(ECLIPSE_ERR_INVALID_ARGUMENT, field + ".channels " + std::to_string(image.channels) +
                                                      " is not 1 (grey), 3 (RGB8) or 4 (RGBA8)");
    if (image.width <= 0 || image.height <= 0)
        throw Error(ECLIPSE_ERR_INVALID_ARGUMENT, what + ": the image is empty (" + std::to_string(image.width) + "x" +
                                                      std::to_string(image.height) + ")");
    if (image.pixels == nullptr) throw Error(ECLIPSE_ERR_INVALID_ARGUMENT, field + " has neither a path nor pixels");
    const size_t row = static_cast<size_t>(image.width) * static_cast<size_t>(image.channels);
    if (image.stride != 0 && image.stride < row)
        throw Error(ECLIPSE_ERR_INVALID_ARGUMENT, field + ".stride " + std::to_string(image.stride) + " is less than a row (" +
                                                      std::to_string(row) + " bytes)");
    return rgb8_from_buffer(image.pixels, image.width, image.height, image.stride, image.channels, what);
}

// str.strip() of the keyword for the ASCII whitespace and the Unicode spaces a keyword may carry
std::string strip(const std::string &s) {
    static const char *kSpaces[] = {" ", "\t", "\n", "\v", "\f", "\r", "\xc2\x85", "\xc2\xa0", "\xe3\x80\x80"};
    size_t begin = 0, end = s.size();
    for (bool again = true; again;) {
        again = false;
        for (const char *sp : kSpaces) {
            const size_t k = std::strlen(sp);
            if (end - begin >= k && s.compare(begin, k, sp) == 0) begin += k, again = true;
            if (end - begin >= k && s.compare(end - k, k, sp) == 0) end -= k, again = true;
        }
    }
    return s.substr(begin, end - begin);
}

// eclipse_params' API 2 fields (and the API 1 noise pointers) as the core's Inputs, every count
// and pointer checked before use
Inputs read_inputs(const eclipse_params &p) {
    Inputs in;
    constexpr const char *kNoiseNames[] = {"prior", "latents", "steps", "sr_latents", "sr_steps"};
    if (p.noise_count > 0 && p.noises == nullptr)
        throw Error(ECLIPSE_ERR_INVALID_ARGUMENT, "eclipse_params.noise_count is " + std::to_string(p.noise_count) +
                                                      " but noises is NULL");
    for (size_t i = 0; i < p.noise_count; ++i) {
        const eclipse_noise &nz = p.noises[i];
        const std::string field = "eclipse_params.noises[" + std::to_string(i) + "]";
        if (nz.name == nullptr) throw Error(ECLIPSE_ERR_INVALID_ARGUMENT, field + ".name is NULL");
        const std::string name = nz.name;
        if (std::find_if(std::begin(kNoiseNames), std::end(kNoiseNames), [&](const char *k) { return name == k; }) ==
            std::end(kNoiseNames))
            throw Error(ECLIPSE_ERR_INVALID_ARGUMENT, field + ".name '" + name +
                                                          "' is not a noise (prior, latents, steps, sr_latents, sr_steps)");
        if (nz.data == nullptr) throw Error(ECLIPSE_ERR_INVALID_ARGUMENT, field + " ('" + name + "') has no data");
        if (!in.noises.emplace(name, NoiseInput{nz.data, nz.count}).second)
            throw Error(ECLIPSE_ERR_INVALID_ARGUMENT, "noise '" + name + "' is given twice in eclipse_params.noises");
    }
    for (const auto &[name, data, count] : {std::tuple{"prior", p.prior_noise, p.prior_noise_count},
                                            std::tuple{"latents", p.latent_noise, p.latent_noise_count},
                                            std::tuple{"steps", p.step_noise, p.step_noise_count}}) {
        if (data == nullptr) continue;
        if (!in.noises.emplace(name, NoiseInput{data, count}).second)
            throw Error(ECLIPSE_ERR_INVALID_ARGUMENT, std::string("noise '") + name +
                                                          "' is given twice (in eclipse_params.noises and its own field)");
    }
    if (p.subject_count > 0 && p.subjects == nullptr)
        throw Error(ECLIPSE_ERR_INVALID_ARGUMENT, "eclipse_params.subject_count is " + std::to_string(p.subject_count) +
                                                      " but subjects is NULL");
    for (size_t i = 0; i < p.subject_count; ++i) {  // as runtime/request.py: keyword, then its image, in order
        const eclipse_subject &sub = p.subjects[i];
        const std::string n = std::to_string(i + 1);
        if (sub.keyword == nullptr)
            throw Error(ECLIPSE_ERR_INVALID_ARGUMENT, "subject " + n + ": the keyword must be a string, got NULL");
        const std::string keyword = sub.keyword;
        if (is_blank(keyword))
            throw Error(ECLIPSE_ERR_INVALID_ARGUMENT, "subject " + n + ": the keyword " + py_repr(keyword) +
                                                          " tokenizes to nothing; give the prompt word the image stands for");
        Rgb8Image image = read_image(sub.image, "eclipse_params.subjects[" + std::to_string(i) + "].image",
                                     "subject image " + n + " (" + keyword + ")");
        in.subjects.push_back({std::move(image), strip(keyword)});
    }
    if (p.control_image != nullptr) in.control = read_image(*p.control_image, "eclipse_params.control_image", "control image");
    return in;
}

}  // namespace

void log(eclipse_log_level level, const std::string &message) {
    eclipse_log_fn fn;
    void *data;
    {
        std::lock_guard<std::mutex> lock(g_log_mutex);
        fn = g_log_fn;
        data = g_log_data;
    }
    if (fn) fn(level, message.c_str(), data);
}

}  // namespace eclipse::core

using namespace eclipse::core;

extern "C" {

const char *eclipse_version(void) { return ECLIPSE_VERSION_STRING; }

const char *eclipse_status_string(eclipse_status s) {
    switch (s) {
        case ECLIPSE_OK: return "ok";
        case ECLIPSE_ERR_INVALID_ARGUMENT: return "invalid argument";
        case ECLIPSE_ERR_BUNDLE: return "bundle error";
        case ECLIPSE_ERR_BACKEND: return "backend error";
        case ECLIPSE_ERR_UNSUPPORTED: return "unsupported";
        case ECLIPSE_ERR_CANCELLED: return "cancelled";
        case ECLIPSE_ERR_IO: return "i/o error";
        case ECLIPSE_ERR_OUT_OF_MEMORY: return "out of memory";
        case ECLIPSE_ERR_INTERNAL: return "internal error";
    }
    return "unknown status";
}

const char *eclipse_last_error(void) { return g_last_error.c_str(); }

void eclipse_set_log_callback(eclipse_log_fn fn, void *user_data) {
    std::lock_guard<std::mutex> lock(g_log_mutex);
    g_log_fn = fn;
    g_log_data = user_data;
}

int eclipse_backend_available(const char *name) {
    if (name == nullptr) return 0;
    const std::string n(name);
    const char *trt = tensorrt_flavour_built_in();
    return n == "custom" || (n == "onnxruntime" && onnxruntime_built_in()) || (trt != nullptr && n == trt);
}

eclipse_tensorrt_options eclipse_tensorrt_default_options(void) {
    eclipse_tensorrt_options o{};
    o.struct_size = sizeof(o);
    o.cuda_graphs = 1;
    return o;
}

eclipse_status eclipse_backend_tensorrt_create(const eclipse_tensorrt_options *options, eclipse_backend **out) {
    return guarded([&] {
        require(out, "out");
        *out = nullptr;
        // released layouts: the first (library_path .. nvrtc_library_path included)
        const auto o = options_or_defaults(options, eclipse_tensorrt_default_options(), {sizeof(eclipse_tensorrt_options)},
                                           "eclipse_tensorrt_options", "eclipse_tensorrt_default_options()");
        *out = new eclipse_backend{make_tensorrt_backend(o)};
    });
}

const char *eclipse_tensorrt_flavour(void) { return tensorrt_flavour_built_in(); }

eclipse_onnxruntime_options eclipse_onnxruntime_default_options(void) {
    eclipse_onnxruntime_options o{};
    o.struct_size = sizeof(o);
    o.providers = "cpu";
    return o;
}

eclipse_status eclipse_backend_onnxruntime_create(const eclipse_onnxruntime_options *options, eclipse_backend **out) {
    return guarded([&] {
        require(out, "out");
        *out = nullptr;
        // released layouts: without library_path (the first C API), and today's
        const auto o = options_or_defaults(options, eclipse_onnxruntime_default_options(),
                                           {offsetof(eclipse_onnxruntime_options, library_path),
                                            sizeof(eclipse_onnxruntime_options)},
                                           "eclipse_onnxruntime_options", "eclipse_onnxruntime_default_options()");
        if (o.providers && !*o.providers)
            throw Error(ECLIPSE_ERR_INVALID_ARGUMENT, "eclipse_onnxruntime_options.providers is empty (NULL: \"cpu\")");
        if (o.intra_op_threads < 0)
            throw Error(ECLIPSE_ERR_INVALID_ARGUMENT, "eclipse_onnxruntime_options.intra_op_threads " +
                                                          std::to_string(o.intra_op_threads) + " is negative (0: ONNX Runtime's default)");
        auto impl = make_onnxruntime_backend(o);
        *out = new eclipse_backend{std::move(impl)};
    });
}

eclipse_status eclipse_backend_custom_create(const eclipse_custom_backend *table, eclipse_backend **out) {
    return guarded([&] {
        require(out, "out");
        *out = nullptr;
        require(table, "table");
        *out = new eclipse_backend{make_custom_backend(*table)};
    });
}

void eclipse_backend_free(eclipse_backend *backend) { delete backend; }

eclipse_status eclipse_bundle_open(const char *path, int verify_hashes, eclipse_bundle **out) {
    return guarded([&] {
        require(out, "out");
        *out = nullptr;
        require(path, "path");
        *out = new eclipse_bundle{BundleData::open(path, verify_hashes != 0)};
    });
}

void eclipse_bundle_free(eclipse_bundle *bundle) { delete bundle; }

int64_t eclipse_bundle_dim(const eclipse_bundle *bundle, const char *name) {
    if (!bundle || !name) return -1;
    if (std::strcmp(name, "T") == 0) return bundle->impl->tokenizer->max_length();
    return bundle->impl->bundle->dim(name);
}

eclipse_status eclipse_tokenize(const eclipse_bundle *bundle, const char *text, int32_t *ids, int32_t *mask,
                                int32_t max_length, int32_t *truncated) {
    return guarded([&] {
        require(bundle, "bundle");
        require(text, "text");
        require(ids, "ids");
        const auto &tok = *bundle->impl->tokenizer;
        if (max_length != tok.max_length())
            throw Error(ECLIPSE_ERR_INVALID_ARGUMENT, "max_length must be the tokenizer's " + std::to_string(tok.max_length()));
        const Tokens t = tok.encode(text);
        std::copy(t.ids.begin(), t.ids.end(), ids);
        if (mask) std::copy(t.mask.begin(), t.mask.end(), mask);
        if (truncated) *truncated = t.truncated ? 1 : 0;
    });
}

eclipse_status eclipse_schedule(const eclipse_bundle *bundle, eclipse_scheduler scheduler, int32_t steps,
                                int64_t *timesteps, eclipse_step_coefficients *coefficients) {
    return guarded([&] {
        require(bundle, "bundle");
        Scheduler s(bundle->impl->scheduler_config, scheduler_kind_name(scheduler));
        s.set_timesteps(steps);
        for (size_t i = 0; i < s.timesteps().size(); ++i) {
            if (timesteps) timesteps[i] = s.timesteps()[i];
            if (coefficients) coefficients[i] = s.coefficients(s.timesteps()[i]);
        }
    });
}

void eclipse_normals(uint64_t seed, uint32_t stream, float *out, size_t count) {
    if (out) standard_normal(seed, stream, out, count);
}

eclipse_status eclipse_context_create(const eclipse_bundle *bundle, eclipse_backend *backend, eclipse_context **out) {
    return guarded([&] {
        require(out, "out");
        *out = nullptr;
        require(bundle, "bundle");
        require(backend, "backend");
        *out = new eclipse_context{Context::create(bundle->impl, backend->impl)};
    });
}

void eclipse_context_free(eclipse_context *context) { delete context; }

eclipse_status eclipse_state_create(eclipse_context *context, eclipse_state **out) {
    return guarded([&] {
        require(out, "out");
        *out = nullptr;
        require(context, "context");
        auto state = std::make_unique<eclipse_state>();
        state->impl.context = context->impl;
        for (const auto &[name, session] : context->impl->sessions) state->impl.session_states[name] = session->new_state();
        *out = state.release();
    });
}

void eclipse_state_free(eclipse_state *state) { delete state; }

eclipse_params eclipse_default_params(void) {
    eclipse_params p{};
    p.struct_size = sizeof(p);
    p.api_version = ECLIPSE_API_VERSION;
    p.width = p.height = 512;
    p.steps = 50;
    p.guidance_scale = 4.0;
    p.scheduler = ECLIPSE_SCHEDULER_BUNDLE;
    return p;
}

eclipse_params eclipse_bundle_default_params(const eclipse_bundle *bundle) {
    eclipse_params p = eclipse_default_params();
    if (bundle && bundle->impl->family && bundle->impl->family->name == "karlo") {
        p.width = p.height = static_cast<int32_t>(bundle->impl->Q);
        p.steps = 25;  // the UnCLIPPipeline's defaults (families/karlo/presets.py PIPELINE_DEFAULTS)
        p.guidance_scale = 8.0;
    }
    return p;
}

eclipse_status eclipse_generate(eclipse_state *state, const char *prompt, const eclipse_params *params,
                                eclipse_result **out) {
    return guarded([&] {
        require(out, "out");
        *out = nullptr;
        require(state, "state");
        eclipse_params p = eclipse_default_params();
        if (params) {
            // released layouts: API 1 (up to step_noise_count) and API 2 (subjects, control image,
            // named noises); a caller built against the older header passes the smaller one, and
            // the fields it lacks keep their defaults (NULL / 0)
            check_struct_size(params->struct_size, {offsetof(eclipse_params, subjects), sizeof(eclipse_params)},
                              "eclipse_params", "eclipse_default_params()");
            if (params->api_version == 0)
                throw Error(ECLIPSE_ERR_INVALID_ARGUMENT, "eclipse_params.api_version is 0: set it to ECLIPSE_API_VERSION "
                                                          "(eclipse_default_params() does)");
            if (params->api_version > ECLIPSE_API_VERSION)
                throw Error(ECLIPSE_ERR_INVALID_ARGUMENT, "eclipse_params come from a newer eclipse.h (API " +
                                                              std::to_string(params->api_version) + ") than this library (" +
                                                              std::to_string(ECLIPSE_API_VERSION) + ")");
            std::memcpy(&p, params, params->struct_size);
        }
        const int32_t scheduler = raw_enum(p.scheduler);
        if (scheduler < ECLIPSE_SCHEDULER_BUNDLE || scheduler > ECLIPSE_SCHEDULER_DDIM)
            throw Error(ECLIPSE_ERR_INVALID_ARGUMENT, "eclipse_params.scheduler " + std::to_string(scheduler) +
                                                          " is not an eclipse_scheduler (0 bundle, 1 ddpm, 2 ddim)");
        const Inputs inputs = read_inputs(p);
        auto result = std::make_unique<eclipse_result>();
        result->impl = generate(state->impl, prompt, p, inputs);
        *out = result.release();
    });
}

int32_t eclipse_result_width(const eclipse_result *r) { return r ? r->impl.width : 0; }
int32_t eclipse_result_height(const eclipse_result *r) { return r ? r->impl.height : 0; }
const uint8_t *eclipse_result_pixels(const eclipse_result *r) { return r ? r->impl.pixels.data() : nullptr; }

double eclipse_result_timing(const eclipse_result *r, const char *stage) {
    if (!r || !stage) return -1;
    auto it = r->impl.timings.find(stage);
    return it == r->impl.timings.end() ? -1 : it->second;
}

size_t eclipse_result_warning_count(const eclipse_result *r) { return r ? r->impl.warnings.size() : 0; }

const char *eclipse_result_warning(const eclipse_result *r, size_t index) {
    return r && index < r->impl.warnings.size() ? r->impl.warnings[index].c_str() : nullptr;
}

eclipse_status eclipse_result_save_png(const eclipse_result *r, const char *path) {
    return guarded([&] {
        require(r, "result");
        require(path, "path");
        save_png(path, r->impl.pixels.data(), r->impl.width, r->impl.height);
    });
}

void eclipse_result_free(eclipse_result *r) { delete r; }

}  // extern "C"
