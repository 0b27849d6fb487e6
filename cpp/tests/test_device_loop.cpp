// The TensorRT backend's device-side LOGIC against a FAKE device (host memory standing in for
// device memory, closures standing in for captured CUDA graphs, a made-up "UNet"): buffer reuse,
// binding, CUDA-graph capture/replay and its fallback, the device loop against the host loop,
// the NaN report, progress/cancel, low-memory engine residency.
//
// This proves logic only, never the CUDA or TensorRT API use: those calls are made against the
// real libraries by eclipse-cuda-check (tests/test_cpp_tensorrt.py) and run on a GPU only where
// one is lent (bench/gpu).
#include <cmath>
#include <cstdio>
#include <cstring>
#include <functional>
#include <limits>
#include <map>
#include <string>
#include <vector>

#include "check.hpp"
#include "fake_device.hpp"  // FakeDevice: the host-memory device
#include "backends/device_loop.hpp"
#include "core/scheduler.hpp"

using namespace eclipse::core;
using namespace eclipse::test;

namespace {


std::vector<std::string> g_log;
void capture_log(eclipse_log_level, const char *message, void *) { g_log.emplace_back(message); }


// A made-up "UNet": noise_pred[r, i] = 0.1 * sample[r, i] + 1e-4 * t + 0.05 * embeds[r, i % D].
float fake_unet(float sample, float t, float embed) { return 0.1f * sample + 1e-4f * t + 0.05f * embed; }

class FakeUnet final : public EngineContext {
public:
    FakeUnet(FakeDevice &device, int64_t max_rows = 2) : device_(device), max_rows_(max_rows) {
        tensors_ = {{"sample", true, IoType::Float32, 4, "float32"},
                    {"timestep", true, IoType::Float32, 4, "float32"},
                    {"image_embeds", true, IoType::Float32, 4, "float32"},
                    {"noise_pred", false, IoType::Float32, 4, "float32"}};
    }
    const std::vector<IoTensor> &tensors() const override { return tensors_; }
    bool set_input_shape(const std::string &name, const std::vector<int64_t> &shape) override {
        if (name == "sample" && shape[0] > max_rows_) return false;  // the engine's profile
        shapes_[name] = shape;
        return true;
    }
    std::vector<int64_t> shape(const std::string &name) const override {
        return name == "noise_pred" ? shapes_.at("sample") : shapes_.at(name);
    }
    void set_address(const std::string &name, DevicePtr p) override { addresses_[name] = p; }
    bool enqueue() override {
        ++enqueues;
        if (device_.capturing && fail_while_capturing) return false;
        const auto s = shapes_.at("sample");
        const int64_t rows = s[0], per_row = s[1] * s[2] * s[3], d = shapes_.at("image_embeds")[1];
        const DevicePtr sample = addresses_.at("sample"), t = addresses_.at("timestep"), e = addresses_.at("image_embeds"),
                        out = addresses_.at("noise_pred");
        FakeDevice &dev = device_;
        device_.queue([=, &dev] {
            auto f = [&](DevicePtr base, int64_t k) -> float & { return *reinterpret_cast<float *>(dev.view(base + 4 * k, 4)); };
            for (int64_t r = 0; r < rows; ++r) {
                for (int64_t i = 0; i < per_row; ++i)
                    f(out, r * per_row + i) = fake_unet(f(sample, r * per_row + i), f(t, 0), f(e, r * d + i % d));
            }
        });
        return true;
    }
    int enqueues = 0;
    bool fail_while_capturing = false;

private:
    FakeDevice &device_;
    int64_t max_rows_;
    std::vector<IoTensor> tensors_;
    std::map<std::string, std::vector<int64_t>> shapes_;
    std::map<std::string, DevicePtr> addresses_;
};

// ---- the request and its host-loop reference ----------------------------------------------------

const nlohmann::json kDdpm = {{"_class_name", "DDPMScheduler"}, {"num_train_timesteps", 1000}, {"beta_start", 0.00085},
                              {"beta_end", 0.012}, {"beta_schedule", "linear"}, {"clip_sample", true},
                              {"prediction_type", "epsilon"}, {"steps_offset", 1}, {"timestep_spacing", "leading"},
                              {"variance_type", "fixed_small"}, {"set_alpha_to_one", false}};

struct Request {
    Scheduler sched;
    int64_t B = 1, C = 4, h = 4, w = 3, D = 5;
    bool cfg;
    float scale;
    std::vector<float> latents, embeds, timesteps, noise;
    std::vector<eclipse_step_coefficients> coefficients;
    std::vector<int> progress_calls;
    int cancel_at = -1;

    Request(const std::string &kind, int steps, bool cfg_, float scale_, int64_t h_ = 4) : sched(kDdpm, kind), h(h_), cfg(cfg_), scale(scale_) {
        sched.set_timesteps(steps);
        const size_t n = static_cast<size_t>(B * C * h * w);
        latents.resize(n);
        for (size_t i = 0; i < n; ++i) latents[i] = std::sin(0.7f * static_cast<float>(i)) * 1.3f;
        for (int64_t r = 0; r < (cfg ? 2 : 1) * D; ++r) embeds.push_back(0.2f * static_cast<float>(r % 7) - 0.5f);
        for (int64_t t : sched.timesteps()) {
            timesteps.push_back(static_cast<float>(t));
            coefficients.push_back(sched.coefficients(t));
        }
        if (sched.needs_noise()) {
            noise.resize(static_cast<size_t>(steps) * n);
            for (size_t i = 0; i < noise.size(); ++i) noise[i] = std::cos(1.3f * static_cast<float>(i));
        }
    }
    size_t n() const { return latents.size(); }

    static int progress(int32_t step, int32_t steps, void *self) {
        auto *r = static_cast<Request *>(self);
        r->progress_calls.push_back(step);
        (void)steps;
        return step == r->cancel_at ? 1 : 0;
    }

    eclipse_denoise_call call(std::vector<float> &out) {
        eclipse_denoise_call c{};
        c.latents = latents.data();
        const int64_t shape[4] = {B, C, h, w};
        std::copy(shape, shape + 4, c.latent_shape);
        c.image_embeds = embeds.data();
        c.embeds_shape[0] = cfg ? 2 : 1;
        c.embeds_shape[1] = D;
        c.steps = static_cast<int32_t>(timesteps.size());
        c.timesteps = timesteps.data();
        c.coefficients = coefficients.data();
        c.cfg = cfg;
        c.guidance_scale = scale;
        c.step_noise = noise.empty() ? nullptr : noise.data();
        out.assign(n(), -7.0f);
        c.out_latents = out.data();
        c.progress = &Request::progress;
        c.progress_data = this;
        return c;
    }

    // pipeline.cpp's host loop with the same fake UNet
    std::vector<float> host_loop() const {
        std::vector<float> x = latents, guided(n());
        const int64_t rows = cfg ? 2 : 1;
        std::vector<float> eps(static_cast<size_t>(rows) * n());
        for (size_t s = 0; s < timesteps.size(); ++s) {
            for (int64_t r = 0; r < rows; ++r) {
                for (size_t i = 0; i < n(); ++i)
                    eps[r * n() + i] = fake_unet(x[i], timesteps[s], embeds[static_cast<size_t>(r * D) + i % static_cast<size_t>(D)]);
            }
            const float *e = eps.data();
            if (cfg) {
                for (size_t k = 0; k < n(); ++k) guided[k] = eps[k] + scale * (eps[n() + k] - eps[k]);
                e = guided.data();
            }
            sched.step(e, sched.timesteps()[s], x.data(), noise.empty() ? nullptr : noise.data() + s * n(), n());
        }
        return x;
    }
};

bool close_to(const std::vector<float> &a, const std::vector<float> &b) {
    // the fused statement (apply_step's coefficients) vs Scheduler::step: ~1e-6 relative (CI
    // holds the two to each other in test_schedulers.py)
    if (a.size() != b.size()) return false;
    for (size_t i = 0; i < a.size(); ++i) {
        if (!(std::fabs(a[i] - b[i]) <= 1e-5f + 1e-5f * std::fabs(b[i]))) return false;
    }
    return true;
}

struct Rig {
    FakeDevice device;
    FakeUnet unet{device};
    std::unique_ptr<Binding> binding;
    std::unique_ptr<LoopBuffers> loop;
    std::vector<std::string> warnings;  // the session state's, which the pipeline moves into the result
    explicit Rig(bool graphs = true) {
        binding = std::make_unique<Binding>(device, unet, BindingOptions{"unet", graphs, "(profile sample rows 1..2)", "rebuild",
                                                                         &warnings});
        loop = std::make_unique<LoopBuffers>(device);
    }
    ~Rig() {
        binding.reset();
        loop.reset();
    }
    bool denoise(Request &r, std::vector<float> &out) { return denoise_on_device(device, *binding, *loop, r.call(out)); }
};

template <class F>
std::string error_of(F &&f) {
    try {
        f();
    } catch (const Error &e) {
        return e.what();
    }
    return "";
}

}  // namespace

int main() {
    eclipse_set_log_callback(capture_log, nullptr);

    run("fake device: the device loop gives the host loop's latents (DDPM + CFG, DDIM without)", [] {
        for (auto [kind, cfg] : {std::pair{"ddpm", true}, std::pair{"ddim", false}}) {
            Rig rig;
            Request r(kind, 6, cfg, 4.0f);
            std::vector<float> out;
            EXPECT(rig.denoise(r, out));
            EXPECT(close_to(out, r.host_loop()));
            // one plain enqueue, captured once, replayed for every later step
            EXPECT(rig.binding->counters().plain_enqueues == 1 && rig.binding->counters().captures == 1);
            EXPECT(rig.binding->counters().graph_launches == 5 && rig.device.kernel_launches == 6);
        }
    });

    run("fake device: buffers are reused until a shape grows, then re-bound and re-captured", [] {
        Rig rig;
        Request r("ddpm", 4, true, 4.0f);
        std::vector<float> out;
        EXPECT(rig.denoise(r, out));
        const int mallocs = rig.device.mallocs;
        const DevicePtr sample = rig.binding->ptr("sample");
        EXPECT(rig.denoise(r, out));  // same request: nothing allocated, the graph replayed from step 0
        EXPECT(rig.device.mallocs == mallocs && rig.binding->ptr("sample") == sample);
        EXPECT(rig.binding->counters().captures == 1 && rig.binding->counters().rebinds == 1);
        EXPECT(close_to(out, r.host_loop()));
        Request smaller("ddpm", 4, false, 1.0f);  // fewer rows: shapes change, buffers stay
        EXPECT(rig.denoise(smaller, out));
        EXPECT(rig.device.mallocs == mallocs && rig.binding->ptr("sample") == sample);
        EXPECT(rig.binding->counters().captures == 2 && close_to(out, smaller.host_loop()));
        Request larger("ddpm", 4, true, 4.0f, 8);  // larger latents: new buffers, new graph
        EXPECT(rig.denoise(larger, out));
        EXPECT(rig.device.mallocs > mallocs && rig.binding->counters().captures == 3);
        EXPECT(close_to(out, larger.host_loop()));
    });

    run("fake device: a failed CUDA-graph capture falls back to plain enqueues with a warning", [] {
        for (const char *where : {"begin", "end", "enqueue"}) {
            Rig rig;
            if (std::string(where) == "enqueue") rig.unet.fail_while_capturing = true;
            else rig.device.fail_capture = where;
            g_log.clear();
            Request r("ddpm", 5, true, 4.0f);
            std::vector<float> out;
            EXPECT(rig.denoise(r, out));
            EXPECT(close_to(out, r.host_loop()));
            EXPECT(rig.binding->capture_failed() && rig.binding->counters().graph_launches == 0);
            EXPECT(rig.binding->counters().plain_enqueues == 5 && rig.device.capturing == nullptr);
            EXPECT(g_log.size() == 1 && g_log[0].find("unet: CUDA-graph capture failed") == 0);
            EXPECT(rig.warnings.size() == 1 && rig.warnings[0] == g_log[0]);
        }
    });

    run("fake device: without CUDA graphs every step is a plain enqueue", [] {
        Rig rig(false);
        Request r("ddim", 4, true, 7.5f);
        std::vector<float> out;
        EXPECT(rig.denoise(r, out));
        EXPECT(close_to(out, r.host_loop()));
        EXPECT(rig.binding->counters().plain_enqueues == 4 && rig.binding->counters().captures == 0);
    });

    run("fake device: NaN latents are an error naming the first bad step, read once after the loop", [] {
        Rig rig;
        rig.device.poison_from_step = 2;
        Request r("ddpm", 5, true, 4.0f);
        std::vector<float> out;
        const std::string e = error_of([&] { rig.denoise(r, out); });
        EXPECT(e.find("NaN/Inf latents at step 3 of 5") != std::string::npos);
        EXPECT(rig.device.kernel_launches == 5);  // no host check between steps
    });

    run("fake device: progress reports work done, one step behind, without draining the stream; cancel stops", [] {
        Rig rig;
        Request r("ddpm", 6, true, 4.0f);
        std::vector<float> out;
        EXPECT(rig.denoise(r, out));
        EXPECT((r.progress_calls == std::vector<int>{1, 2, 3, 4, 5, 6}));
        // each wait was for the previous step's event: step i reported when i kernels had run
        EXPECT((rig.device.waited == std::vector<int>{1, 2, 3, 4, 5}));
        EXPECT(rig.device.synchronizations == 2);  // before the capture and after the loop
        Request c("ddpm", 6, true, 4.0f);
        c.cancel_at = 2;
        EXPECT(!rig.denoise(c, out));
        EXPECT((c.progress_calls == std::vector<int>{1, 2}));
        EXPECT(rig.device.events.empty());
    });

    run("fake device: an event that cannot be created leaks none made before it (issue 18 #10)", [] {
        Rig rig;
        rig.device.fail_event_at = 1;  // the second of the two progress events
        Request r("ddpm", 3, true, 4.0f);
        std::vector<float> out;
        EXPECT(error_of([&] { rig.denoise(r, out); }) == "CUDA cuEventCreate failed: fake");
        EXPECT(rig.device.events_created == 2 && rig.device.events.empty());
    });

    run("fake device: a shape outside the engine's profile is refused with the profile and the fix", [] {
        FakeDevice device;
        FakeUnet unet(device, 1);  // a static CFG-less engine: one row
        Binding b(device, unet, BindingOptions{"unet", true, "(profile sample rows 1..1)", "rebuild"});
        LoopBuffers loop(device);
        Request r("ddpm", 2, true, 4.0f);
        std::vector<float> out;
        const std::string e = error_of([&] { denoise_on_device(device, b, loop, r.call(out)); });
        EXPECT(e.find("unet.sample: shape (2, 4, 4, 3) is outside the engine's profile (profile sample rows 1..1)") == 0);
        EXPECT(e.find("--static") != std::string::npos);
    });

    run("fake device: Session::run copies in, enqueues once, copies out; type and size mismatches refused", [] {
        FakeDevice device;
        FakeUnet unet(device);
        Binding b(device, unet, BindingOptions{"unet", true, "", "rebuild on this machine"});
        std::vector<float> sample(2 * 4 * 2 * 2, 0.5f), t{10.0f}, embeds(2 * 5, 1.0f), pred(sample.size(), -1.0f);
        std::vector<TensorView> in{{"sample", DType::Float32, {2, 4, 2, 2}, sample.data()},
                                   {"timestep", DType::Float32, {1}, t.data()},
                                   {"image_embeds", DType::Float32, {2, 5}, embeds.data()}};
        std::vector<TensorView> out{{"noise_pred", DType::Float32, {2, 4, 2, 2}, pred.data()}};
        b.run(in, out);
        EXPECT(pred[0] == fake_unet(0.5f, 10.0f, 1.0f) && pred.back() == pred[0]);
        EXPECT(b.counters().plain_enqueues == 1 && b.counters().captures == 0);
        std::vector<int32_t> ids(1);
        std::vector<TensorView> wrong{{"sample", DType::Float32, {2, 4, 2, 2}, sample.data()},
                                      {"timestep", DType::Int32, {1}, ids.data()},
                                      {"image_embeds", DType::Float32, {2, 5}, embeds.data()}};
        EXPECT(error_of([&] { b.run(wrong, out); }) == "unet.timestep is float32 in the engine, int32 in the bundle's graph; rebuild on this machine");
        std::vector<TensorView> short_out{{"noise_pred", DType::Float32, {1, 4, 2, 2}, pred.data()}};
        EXPECT(error_of([&] { b.run(in, short_out); }).find("unet.noise_pred: the engine gives (2, 4, 2, 2), the bundle's graph (1, 4, 2, 2)") == 0);
    });

    run("engine residency: normal mode loads once; low-memory loads per stage and shares a live engine", [] {
        struct Engine {
            int *alive;
            explicit Engine(int *a) : alive(a) { ++*alive; }
            ~Engine() { --*alive; }
        };
        int loads = 0, alive = 0;
        auto loader = [&] { ++loads; return std::make_shared<const Engine>(&alive); };
        {
            EngineHolder<Engine> normal(loader, false);
            EXPECT(loads == 1 && alive == 1);
            { auto a = normal.acquire(); }
            { auto b = normal.acquire(); }
            EXPECT(loads == 1 && alive == 1);
        }
        EXPECT(alive == 0);
        loads = 0;
        EngineHolder<Engine> low(loader, true);
        EXPECT(loads == 0 && alive == 0);  // nothing resident before a stage starts
        {
            auto stage = low.acquire();
            auto other_state = low.acquire();  // a second generation in the same stage shares it
            EXPECT(loads == 1 && alive == 1 && stage == other_state);
        }
        EXPECT(alive == 0);  // stage_done: freed
        { auto again = low.acquire(); EXPECT(loads == 2 && alive == 1); }
        EXPECT(alive == 0);
    });

    return finish();
}
