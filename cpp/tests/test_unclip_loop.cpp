// Karlo's device loops (backends/device_loop.cpp denoise_unclip_on_device) against the fake
// device, with the unclip_step kernel's own source compiled for the host (the CUDA built-ins
// shimmed, one thread at a time, -ffp-contract=off as NVRTC's --fmad=false): the decoder loop
// (learned variance, guidance on the noise channels, one UNet) and the super-resolution loop
// (fixed variance, super_res_first then super_res_last) give exactly what the host loop of
// chain_karlo.cpp computes with UnclipScheduler::step; the switch frees the first engine before
// the last binds; progress, cancel and the NaN report as in the Kandinsky loop.
#include <cmath>
#include <cstdio>
#include <string>
#include <vector>

#include "check.hpp"
#include "core/unclip_scheduler.hpp"
#include "fake_device.hpp"

// ---- the kernels' source, for the host ----------------------------------------------------------
namespace kernel {
using std::isfinite;
struct Dim {
    unsigned x = 0;
};
Dim blockIdx, blockDim{1}, threadIdx;
unsigned atomicCAS(unsigned *a, unsigned compare, unsigned value) {
    const unsigned old = *a;
    if (old == compare) *a = value;
    return old;
}
#define __global__
#include ECLIPSE_KERNEL_FILE
#undef __global__
}  // namespace kernel

using namespace eclipse::core;
using namespace eclipse::test;

namespace {

const nlohmann::json kDecoder = {{"_class_name", "UnCLIPScheduler"}, {"num_train_timesteps", 1000},
                                 {"variance_type", "learned_range"}, {"clip_sample", true}, {"clip_sample_range", 1.0},
                                 {"prediction_type", "epsilon"}};
const nlohmann::json kSuperRes = {{"_class_name", "UnCLIPScheduler"}, {"num_train_timesteps", 1000},
                                  {"variance_type", "fixed_small_log"}, {"clip_sample", true}, {"clip_sample_range", 1.0},
                                  {"prediction_type", "epsilon"}};

class KarloDevice final : public FakeDevice {
public:
    int poison_step = -1;  // the latents turn NaN before this step's kernel
    void unclip_step(const UnclipStepArgs &a) override {
        queue([=] {
            ++kernel_launches;
            const int64_t rows = a.n / (a.channels * a.plane) * (a.cfg ? 2 : 1);
            auto *pred = reinterpret_cast<const float *>(view(a.pred, static_cast<size_t>(rows * a.pred_channels * a.plane) * 4));
            auto *x = reinterpret_cast<float *>(view(a.latents, static_cast<size_t>(a.n) * 4));
            auto *noise = a.noise ? reinterpret_cast<const float *>(view(a.noise, static_cast<size_t>(a.n) * 4)) : nullptr;
            auto *out = a.sample_out ? reinterpret_cast<float *>(view(a.sample_out, static_cast<size_t>(rows * a.channels * a.plane) * 4))
                                     : nullptr;
            auto *bad = reinterpret_cast<unsigned *>(view(a.bad_step, 4));
            if (static_cast<int>(a.step) == poison_step) x[0] = std::nanf("");
            for (int64_t i = 0; i < a.n; ++i) {
                kernel::blockIdx.x = static_cast<unsigned>(i);
                kernel::unclip_step(pred, x, noise, out, a.n, a.plane, a.channels, a.pred_channels, a.cfg, a.scale, a.k.a, a.k.b,
                                    a.k.clip, a.k.c_x0, a.k.c_x, a.k.learned ? 1 : 0, a.k.std_dev, a.k.min_log, a.k.max_log,
                                    bad, a.step);
            }
        });
    }
};

// A made-up unCLIP UNet: pred[r, c, s] = tanh(w * sample[r, c % C, s] + 1e-3 * t + 0.1 * cond[r] + 0.01 * mask[r]),
// C or 2C output channels (the variance channels in tanh's range, as the decoder's).
float fake_pred(float w, float sample, float t, float cond, int32_t mask) {
    return std::tanh(w * sample + 1e-3f * t + 0.1f * cond + 0.01f * static_cast<float>(mask));
}

class FakeKarloUnet final : public EngineContext {
public:
    FakeKarloUnet(KarloDevice &device, int64_t out_channels, float w) : device_(device), out_channels_(out_channels), w_(w) {
        tensors_ = {{"sample", true, IoType::Float32, 4, "float32"},      {"timestep", true, IoType::Float32, 4, "float32"},
                    {"cond", true, IoType::Float32, 4, "float32"},        {"mask", true, IoType::Int32, 4, "int32"},
                    {"noise_pred", false, IoType::Float32, 4, "float32"}};
    }
    const std::vector<IoTensor> &tensors() const override { return tensors_; }
    bool set_input_shape(const std::string &name, const std::vector<int64_t> &shape) override {
        shapes_[name] = shape;
        return true;
    }
    std::vector<int64_t> shape(const std::string &name) const override {
        if (name != "noise_pred") return shapes_.at(name);
        auto s = shapes_.at("sample");
        s[1] = out_channels_;
        return s;
    }
    void set_address(const std::string &name, DevicePtr p) override { addresses_[name] = p; }
    bool enqueue() override {
        ++enqueues;
        const auto s = shapes_.at("sample");
        const int64_t rows = s[0], c = s[1], plane = s[2] * s[3], oc = out_channels_;
        const float w = w_;
        auto a = addresses_;
        KarloDevice &dev = device_;
        device_.queue([=, &dev] {
            auto f = [&](DevicePtr base, int64_t k) -> float & { return *reinterpret_cast<float *>(dev.view(base + 4 * k, 4)); };
            auto m = [&](int64_t k) { return *reinterpret_cast<int32_t *>(dev.view(a.at("mask") + 4 * k, 4)); };
            for (int64_t r = 0; r < rows; ++r)
                for (int64_t ch = 0; ch < oc; ++ch)
                    for (int64_t q = 0; q < plane; ++q)
                        f(a.at("noise_pred"), (r * oc + ch) * plane + q) =
                            fake_pred(w, f(a.at("sample"), (r * c + ch % c) * plane + q), f(a.at("timestep"), 0), f(a.at("cond"), r), m(r));
        });
        return true;
    }
    int enqueues = 0;

private:
    KarloDevice &device_;
    int64_t out_channels_;
    float w_;
    std::vector<IoTensor> tensors_;
    std::map<std::string, std::vector<int64_t>> shapes_;
    std::map<std::string, DevicePtr> addresses_;
};

struct Loop {
    UnclipScheduler sched;
    bool cfg, two;
    float scale;
    int64_t C = 3, H = 4;
    std::vector<float> latents, noise, cond;
    std::vector<int32_t> mask;
    std::vector<int> progress;
    int cancel_at = -1;

    Loop(const nlohmann::json &config, int steps, bool cfg_, bool two_) : sched(config), cfg(cfg_), two(two_), scale(cfg_ ? 8.0f : 1.0f) {
        sched.set_timesteps(steps);
        const size_t n = static_cast<size_t>(C * H * H);
        for (size_t i = 0; i < n; ++i) latents.push_back(1.7f * std::sin(0.9f * static_cast<float>(i)));
        for (size_t i = 0; i < static_cast<size_t>(steps) * n; ++i) noise.push_back(std::cos(1.1f * static_cast<float>(i)));
        cond = cfg ? std::vector<float>{-0.4f, 0.7f} : std::vector<float>{0.7f};
        mask = cfg ? std::vector<int32_t>{3, 5} : std::vector<int32_t>{5};
    }
    size_t n() const { return latents.size(); }
    int64_t rows() const { return cfg ? 2 : 1; }
    int64_t pc() const { return sched.learned() ? 2 * C : C; }

    UnclipLoopCall call(std::vector<float> &out) {
        UnclipLoopCall c;
        c.latents = latents.data();
        const int64_t shape[4] = {1, C, H, H};
        std::copy(shape, shape + 4, c.latent_shape);
        c.constants = {{"cond", DType::Float32, {rows(), 1}, cond.data()}, {"mask", DType::Int32, {rows(), 1}, mask.data()}};
        for (size_t i = 0; i < sched.timesteps().size(); ++i) {
            c.timesteps.push_back(static_cast<float>(sched.timesteps()[i]));
            c.terms.push_back(sched.terms(sched.timesteps()[i], sched.prev_timestep(i)));
        }
        c.cfg = cfg, c.guidance_scale = scale, c.step_noise = noise.data();
        out.assign(n(), -7.0f);
        c.out_latents = out.data();
        c.progress = [this](int32_t done, int32_t) {
            progress.push_back(done);
            return done != cancel_at;
        };
        return c;
    }

    // chain_karlo.cpp's host loop with the same fake UNets
    std::vector<float> host_loop() const {
        std::vector<float> x = latents, eps(n()), variance(n());
        const size_t steps = sched.timesteps().size(), plane = static_cast<size_t>(H * H);
        std::vector<float> pred(static_cast<size_t>(rows() * pc()) * plane);
        for (size_t i = 0; i < steps; ++i) {
            const int64_t t = sched.timesteps()[i];
            const float w = two && i + 1 == steps ? 0.3f : 0.8f;
            for (int64_t r = 0; r < rows(); ++r)
                for (int64_t ch = 0; ch < pc(); ++ch)
                    for (size_t q = 0; q < plane; ++q)
                        pred[static_cast<size_t>(r * pc() + ch) * plane + q] =
                            fake_pred(w, x[static_cast<size_t>(ch % C) * plane + q], static_cast<float>(t), cond[r], mask[r]);
            const float *c = pred.data() + (rows() - 1) * pc() * static_cast<int64_t>(plane), *u = pred.data();
            for (size_t k = 0; k < n(); ++k) {
                eps[k] = cfg ? u[k] + scale * (c[k] - u[k]) : c[k];
                if (sched.learned()) variance[k] = c[n() + k];
            }
            sched.step(eps.data(), sched.learned() ? variance.data() : nullptr, t, sched.prev_timestep(i), x.data(),
                       noise.data() + i * n(), n());
        }
        return x;
    }
};

struct Rig {
    KarloDevice device;
    FakeKarloUnet first, last;
    std::unique_ptr<Binding> first_binding, last_binding;
    std::unique_ptr<LoopBuffers> buffers;
    int switches = 0;
    Rig(int64_t out_channels) : first(device, out_channels, 0.8f), last(device, out_channels, 0.3f) {
        first_binding = std::make_unique<Binding>(device, first, BindingOptions{"super_res_first", true, "", "rebuild"});
        buffers = std::make_unique<LoopBuffers>(device);
    }
    ~Rig() {
        first_binding.reset();
        last_binding.reset();
        buffers.reset();
    }
    bool run(Loop &loop, std::vector<float> &out) {
        std::vector<UnclipUnet> unets{{&device, [this]() -> Binding & { return *first_binding; }, "decoder"}};
        if (loop.two) {
            unets.push_back({&device, [this]() -> Binding & {
                                 if (!last_binding)
                                     last_binding = std::make_unique<Binding>(device, last, BindingOptions{"super_res_last", true, "", "rebuild"});
                                 return *last_binding;
                             },
                             "super_res_last"});
        }
        return denoise_unclip_on_device(*buffers, unets, loop.call(out), [this] {
            ++switches;
            EXPECT(!last_binding);  // the first engine goes before the last binds
            first_binding.reset();
        });
    }
};

bool same(const std::vector<float> &a, const std::vector<float> &b) {
    if (a.size() != b.size()) return false;
    for (size_t i = 0; i < a.size(); ++i)
        if (std::memcmp(&a[i], &b[i], 4) != 0) return false;
    return true;
}

}  // namespace

int main() {
    run("the decoder loop (learned variance, guidance on the noise channels) is the host loop exactly", [] {
        for (bool cfg : {true, false}) {
            Loop loop(kDecoder, 5, cfg, false);
            Rig rig(loop.pc());
            std::vector<float> out;
            EXPECT(rig.run(loop, out));
            EXPECT(same(out, loop.host_loop()));
            EXPECT(rig.device.kernel_launches == 5 && rig.first.enqueues == 2 && rig.device.graph_launches == 4);
            EXPECT((loop.progress == std::vector<int>{1, 2, 3, 4, 5}));
            EXPECT(rig.switches == 0);
        }
    });

    run("the super-resolution loop switches to the last UNet for the last step, freeing the first", [] {
        Loop loop(kSuperRes, 7, false, true);
        Rig rig(loop.pc());
        std::vector<float> out;
        EXPECT(rig.run(loop, out));
        EXPECT(same(out, loop.host_loop()));
        EXPECT(rig.switches == 1 && rig.last.enqueues == 1);  // run once: not captured
        EXPECT(rig.first.enqueues == 2 && rig.device.graph_launches == 5);
        EXPECT((loop.progress == std::vector<int>{1, 2, 3, 4, 5, 6, 7}));
    });

    run("the host loop differs from a loop with the UNets swapped (the switch is observable)", [] {
        Loop loop(kSuperRes, 3, false, true), one(kSuperRes, 3, false, false);
        EXPECT(!same(loop.host_loop(), one.host_loop()));
    });

    run("cancel at the switch stops before the last UNet loads; NaN names its step", [] {
        Loop loop(kSuperRes, 4, false, true);
        loop.cancel_at = 3;
        Rig rig(loop.pc());
        std::vector<float> out;
        EXPECT(!rig.run(loop, out));
        EXPECT(rig.switches == 0 && rig.last.enqueues == 0);
        Loop bad(kDecoder, 4, true, false);
        Rig rig2(bad.pc());
        rig2.device.poison_step = 2;
        std::string message;
        try {
            rig2.run(bad, out);
        } catch (const Error &e) {
            message = e.what();
        }
        EXPECT(message.find("decoder loop produced NaN/Inf at step 3 of 4") != std::string::npos);
    });
    return finish();
}
