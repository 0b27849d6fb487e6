// eclipse-cuda-check device [OUT_JSON]: the C++ CUDA layer on a real GPU (issue 18, 2c). No
// TensorRT: the "UNet" is a stand-in EngineContext whose enqueue launches an NVRTC kernel
// computing a known function of sample, timestep and embeddings on the binding's stream, so the
// backend's own device loop (device_loop.cpp: Binding, grow-only buffers, CUDA-graph capture and
// replay, re-capture after a shape change, the fused guided_step, the NaN flag, events) runs for
// real and is compared with the host statement of the same arithmetic.
//
// Exact comparisons: the kernels are compiled with --fmad=false and this file with
// -ffp-contract=off, so device and host round identically (IEEE float32 +, *, /).
// Prints one JSON object (and writes it to OUT_JSON): "ok" true only when every check passed.
#include <dlfcn.h>

#include <algorithm>
#include <chrono>
#include <cstdlib>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <functional>
#include <limits>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "backends/device_loop.hpp"
#include "cuda/cuda_stream.hpp"
#include "core/unclip_scheduler.hpp"
#include "cuda/nvrtc.hpp"

using namespace eclipse::core;
using nlohmann::json;

namespace {

const char *kFakeUnetSource = R"(
extern "C" __global__ void fake_unet(const float* sample, const float* t, const float* embeds, float* out,
                                     long long rows, long long per_row, long long d) {
    long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= rows * per_row) return;
    long long r = i / per_row, k = i % per_row;
    out[i] = 0.1f * sample[i] + 1e-4f * t[0] + 0.05f * embeds[r * d + k % d];
}
)";

float fake_unet(float sample, float t, float embed) { return 0.1f * sample + 1e-4f * t + 0.05f * embed; }

// kernels/guided_step.cu's statement for one element; returns prev
float step_statement(const GuidedStepArgs &a, const float *pred, float x, const float *noise, int64_t i) {
    float eps = pred[i];
    if (a.cfg) {
        const float c = pred[i + a.n];
        eps = eps + a.scale * (c - eps);
    }
    float x0 = (x - a.k.b * eps) / a.k.a;
    x0 = x0 < -a.k.clip ? -a.k.clip : (x0 > a.k.clip ? a.k.clip : x0);
    float prev = a.k.c_x0 * x0 + a.k.c_x * x + a.k.c_eps * eps;
    if (noise != nullptr && a.k.std != 0.0f) prev = prev + a.k.std * noise[i];
    return prev;
}

bool same(float a, float b) { return (std::isnan(a) && std::isnan(b)) || std::memcmp(&a, &b, 4) == 0; }

struct Gpu {
    std::shared_ptr<const CudaDriver> driver;
    std::shared_ptr<const Nvrtc> nvrtc;
    CudaDevice device;
    CUcontext context = nullptr;
    std::shared_ptr<const GuidedStepKernel> kernel;
    CUmodule unet_module = nullptr;
    CUfunction unet_function = nullptr;
};

// The stand-in UNet: the backend's EngineContext interface over one NVRTC kernel.
class KernelUnet final : public EngineContext {
public:
    KernelUnet(const Gpu &gpu, CudaStream &stream) : gpu_(gpu), stream_(stream) {
        tensors_ = {{"sample", true, IoType::Float32, 4, "float32"},
                    {"timestep", true, IoType::Float32, 4, "float32"},
                    {"image_embeds", true, IoType::Float32, 4, "float32"},
                    {"noise_pred", false, IoType::Float32, 4, "float32"}};
    }
    const std::vector<IoTensor> &tensors() const override { return tensors_; }
    bool set_input_shape(const std::string &name, const std::vector<int64_t> &shape) override {
        shapes_[name] = shape;
        return true;
    }
    std::vector<int64_t> shape(const std::string &name) const override {
        return name == "noise_pred" ? shapes_.at("sample") : shapes_.at(name);
    }
    void set_address(const std::string &name, DevicePtr p) override { addresses_[name] = p; }
    bool enqueue() override {
        const auto &s = shapes_.at("sample");
        long long rows = s[0], per_row = s[1] * s[2] * s[3], d = shapes_.at("image_embeds")[1];
        CUdeviceptr sample = addresses_.at("sample"), t = addresses_.at("timestep"), e = addresses_.at("image_embeds"),
                    out = addresses_.at("noise_pred");
        void *params[] = {&sample, &t, &e, &out, &rows, &per_row, &d};
        const auto blocks = static_cast<unsigned>((rows * per_row + 255) / 256);
        ++enqueues;
        return gpu_.driver->LaunchKernel(gpu_.unet_function, blocks, 1, 1, 256, 1, 1, 0, stream_.get(), params, nullptr) ==
               CUDA_SUCCESS;
    }
    int enqueues = 0;

private:
    const Gpu &gpu_;
    CudaStream &stream_;
    std::vector<IoTensor> tensors_;
    std::map<std::string, std::vector<int64_t>> shapes_;
    std::map<std::string, DevicePtr> addresses_;
};

struct Request {
    int64_t B = 1, C = 4, h = 16, w = 16, D = 8;
    bool cfg = true;
    float scale = 4.0f;
    float clip = 1.0f;
    int steps = 6;
    bool noise = true;
    std::vector<float> latents, embeds, timesteps, step_noise;
    std::vector<eclipse_step_coefficients> k;

    void make() {
        const size_t n = static_cast<size_t>(B * C * h * w);
        latents.resize(n);
        for (size_t i = 0; i < n; ++i) latents[i] = std::sin(0.37f * static_cast<float>(i)) * 1.7f;
        embeds.clear();
        for (int64_t r = 0; r < (cfg ? 2 : 1) * B * D; ++r) embeds.push_back(0.1f * static_cast<float>(r % 9) - 0.4f);
        timesteps.clear(), k.clear();
        for (int s = 0; s < steps; ++s) {
            timesteps.push_back(static_cast<float>(999 - 160 * s));
            k.push_back({0.9f - 0.05f * static_cast<float>(s), 0.4f + 0.01f * static_cast<float>(s), clip, 0.3f, 0.6f, 0.1f,
                         noise ? 0.05f : 0.0f});
        }
        step_noise.clear();
        if (noise) {
            step_noise.resize(static_cast<size_t>(steps) * n);
            for (size_t i = 0; i < step_noise.size(); ++i) step_noise[i] = std::cos(1.1f * static_cast<float>(i));
        }
    }
    size_t n() const { return latents.size(); }

    eclipse_denoise_call call(std::vector<float> &out) const {
        eclipse_denoise_call c{};
        c.latents = latents.data();
        const int64_t shape[4] = {B, C, h, w};
        std::copy(shape, shape + 4, c.latent_shape);
        c.image_embeds = embeds.data();
        c.embeds_shape[0] = (cfg ? 2 : 1) * B;
        c.embeds_shape[1] = D;
        c.steps = steps;
        c.timesteps = timesteps.data();
        c.coefficients = k.data();
        c.cfg = cfg;
        c.guidance_scale = scale;
        c.step_noise = noise ? step_noise.data() : nullptr;
        out.assign(n(), -7.0f);
        c.out_latents = out.data();
        return c;
    }

    // the host loop: the same UNet function, the kernel's statement
    std::vector<float> host_loop() const {
        std::vector<float> x = latents;
        const int64_t rows = (cfg ? 2 : 1) * B, per_row = C * h * w;
        std::vector<float> pred(static_cast<size_t>(rows * per_row));
        for (int s = 0; s < steps; ++s) {
            for (int64_t r = 0; r < rows; ++r) {
                for (int64_t i = 0; i < per_row; ++i)
                    pred[r * per_row + i] = fake_unet(x[(r % B) * per_row + i], timesteps[s], embeds[r * D + i % D]);
            }
            GuidedStepArgs a;
            a.n = static_cast<int64_t>(n()), a.cfg = cfg, a.scale = cfg ? scale : 1.0f, a.k = k[s];
            const float *nz = noise ? step_noise.data() + s * n() : nullptr;
            for (int64_t i = 0; i < a.n; ++i) x[i] = step_statement(a, pred.data(), x[i], nz, i);
        }
        return x;
    }
};

json g_checks = json::object();
bool g_ok = true;

void check(const std::string &name, const std::function<json()> &fn) {
    json r;
    try {
        r = fn();
    } catch (const std::exception &e) {
        r = {{"ok", false}, {"error", e.what()}};
    }
    if (!r.value("ok", false)) g_ok = false;
    g_checks[name] = r;
}

json compare(const std::vector<float> &got, const std::vector<float> &want) {
    size_t mismatches = 0;
    float max_diff = 0.0f;
    for (size_t i = 0; i < want.size(); ++i) {
        if (!same(got[i], want[i])) {
            ++mismatches;
            if (std::isfinite(got[i]) && std::isfinite(want[i])) max_diff = std::max(max_diff, std::fabs(got[i] - want[i]));
        }
    }
    return {{"elements", want.size()}, {"mismatches", mismatches}, {"max_abs_diff", max_diff}};
}

}  // namespace

int run_device_check(int argc, char **argv) {
    const auto t0 = std::chrono::steady_clock::now();
    Gpu gpu;
    gpu.driver = CudaDriver::open();
    void *lib = dlopen("libcuda.so.1", RTLD_NOW | RTLD_NOLOAD);
    auto get_current = reinterpret_cast<CUresult (*)(CUcontext *)>(dlsym(lib, "cuCtxGetCurrent"));
    gpu.device = gpu.driver->device(0);  // cuInit: the context queries answer from here on
    CUcontext before = reinterpret_cast<CUcontext>(uintptr_t{1});
    gpu.driver->check(get_current(&before), "cuCtxGetCurrent");
    const int cuda_major = gpu.driver->driver_version() / 1000;
    gpu.nvrtc = Nvrtc::open("", cuda_major);
    gpu.context = gpu.driver->retain_primary_context(0);
    json out = {{"gpu", gpu.device.name}, {"compute_capability", gpu.device.compute_capability()},
                {"driver_cuda", gpu.driver->driver_version()}, {"nvrtc", gpu.nvrtc->path()}};
    {
        const ContextGuard guard(*gpu.driver, gpu.context);
        gpu.kernel = std::make_shared<const GuidedStepKernel>(gpu.driver, gpu.context, *gpu.nvrtc, gpu.device);
        out["guided_step"] = gpu.kernel->compiled().kind + " " + gpu.kernel->compiled().arch;
        const CompiledKernel unet = gpu.nvrtc->compile(kFakeUnetSource, "fake_unet", gpu.device.sm());
        gpu.driver->check(gpu.driver->ModuleLoadData(&gpu.unet_module, unet.image.data()), "cuModuleLoadData(fake_unet)");
        gpu.driver->check(gpu.driver->ModuleGetFunction(&gpu.unet_function, gpu.unet_module, "fake_unet"), "cuModuleGetFunction");
    }
    CudaStream stream(gpu.driver, gpu.context, gpu.kernel);

    // a. the fused step alone: CFG on/off x noise on/off x finite/infinite clip, NaN/Inf inputs
    check("guided_step cases", [&] {
        const ContextGuard guard(*gpu.driver, gpu.context);
        const int64_t n = 1 << 16;
        json cases = json::array();
        bool ok = true;
        for (int cfg : {0, 1}) {
            for (bool noise : {false, true}) {
                for (float clip : {1.0f, std::numeric_limits<float>::infinity()}) {
                    std::vector<float> pred(static_cast<size_t>((cfg ? 2 : 1) * n)), x(n), nz(n);
                    for (int64_t i = 0; i < n; ++i) {
                        x[i] = 3.0f * std::sin(0.13f * static_cast<float>(i));
                        nz[i] = std::cos(0.7f * static_cast<float>(i));
                    }
                    for (size_t i = 0; i < pred.size(); ++i) pred[i] = std::sin(0.29f * static_cast<float>(i) + 1.0f);
                    x[5] = std::nanf(""), pred[9] = std::numeric_limits<float>::infinity(), x[17] = -0.0f;
                    GuidedStepArgs a;
                    a.n = n, a.cfg = cfg, a.scale = cfg ? 5.5f : 1.0f, a.k = {0.31f, 0.95f, clip, 0.52f, 0.47f, 0.02f, 0.11f};
                    a.step = 3;
                    DeviceBuffer dp(stream), dx(stream), dn(stream), ds(stream), flag(stream);
                    dp.ensure(pred.size() * 4), dx.ensure(n * 4), dn.ensure(n * 4), ds.ensure(pred.size() * 4), flag.ensure(4);
                    stream.upload(dp.ptr(), pred.data(), pred.size() * 4);
                    stream.upload(dx.ptr(), x.data(), n * 4);
                    stream.upload(dn.ptr(), nz.data(), n * 4);
                    stream.fill_u32(flag.ptr(), 0, 1);
                    a.pred = dp.ptr(), a.latents = dx.ptr(), a.noise = noise ? dn.ptr() : 0, a.sample_out = ds.ptr();
                    a.bad_step = flag.ptr();
                    stream.guided_step(a);
                    std::vector<float> got(n), sample(pred.size());
                    uint32_t bad = 0;
                    stream.download(got.data(), dx.ptr(), n * 4);
                    stream.download(sample.data(), ds.ptr(), pred.size() * 4);
                    stream.download(&bad, flag.ptr(), 4);
                    stream.synchronize();
                    std::vector<float> want(n);
                    bool finite = true;
                    for (int64_t i = 0; i < n; ++i) {
                        want[i] = step_statement(a, pred.data(), x[i], noise ? nz.data() : nullptr, i);
                        finite = finite && std::isfinite(want[i]);
                    }
                    json c = compare(got, want);
                    bool sample_ok = true;
                    for (int64_t i = 0; i < n; ++i)
                        sample_ok = sample_ok && same(sample[i], want[i]) && (!cfg || same(sample[i + n], want[i]));
                    const bool case_ok = c["mismatches"] == 0 && sample_ok && bad == (finite ? 0u : 4u) && std::isnan(got[5]);
                    c.update({{"cfg", cfg}, {"noise", noise}, {"clip", std::isinf(clip) ? "inf" : "1"}, {"bad_step", bad},
                              {"sample_out_ok", sample_ok}, {"ok", case_ok}});
                    ok = ok && case_ok;
                    cases.push_back(c);
                }
            }
        }
        return json{{"ok", ok}, {"cases", cases}};
    });

    // a2. Karlo's unclip_step (issue 20): every step of a 5-step schedule, the decoder's learned
    // variance with and without CFG and the super-resolution's fixed one, against
    // UnclipScheduler::step after the chain's guidance (chain_karlo.cpp). Exact, except the
    // learned std's double exp (the GPU's vs glibc's, rounded to float after): at most 1 ulp.
    check("unclip_step cases", [&] {
        const ContextGuard guard(*gpu.driver, gpu.context);
        const int64_t B = 2, C = 3, plane = 64 * 64, n = B * C * plane;
        json cases = json::array();
        bool ok = true;
        for (auto [variance, cfg] : {std::pair{"learned_range", 1}, std::pair{"learned_range", 0}, std::pair{"fixed_small_log", 0}}) {
            UnclipScheduler sched(json{{"variance_type", variance}});
            sched.set_timesteps(5);
            const int pc = sched.learned() ? 2 * C : C;
            const int64_t rows = cfg ? 2 * B : B;
            std::vector<float> pred(static_cast<size_t>(rows * pc * plane)), x0(n), nz(n);
            for (size_t i = 0; i < pred.size(); ++i) pred[i] = std::tanh(2.0f * std::sin(0.37f * static_cast<float>(i)));
            for (int64_t i = 0; i < n; ++i) x0[i] = 3.0f * std::sin(0.11f * static_cast<float>(i)), nz[i] = std::cos(0.7f * static_cast<float>(i));
            DeviceBuffer dp(stream), dx(stream), dn(stream), flag(stream);
            dp.ensure(pred.size() * 4), dx.ensure(n * 4), dn.ensure(n * 4), flag.ensure(4);
            stream.upload(dp.ptr(), pred.data(), pred.size() * 4);
            stream.upload(dn.ptr(), nz.data(), n * 4);
            int64_t max_ulps = 0, mismatches = 0;
            uint32_t bad = 0;
            for (size_t i = 0; i < sched.timesteps().size(); ++i) {
                const int64_t t = sched.timesteps()[i];
                UnclipStepArgs a;
                a.pred = dp.ptr(), a.latents = dx.ptr(), a.bad_step = flag.ptr();
                a.k = sched.terms(t, sched.prev_timestep(i));
                a.noise = a.k.noise ? dn.ptr() : 0;
                a.n = n, a.plane = plane, a.channels = C, a.pred_channels = pc, a.cfg = cfg, a.scale = cfg ? 8.0f : 1.0f;
                a.step = static_cast<uint32_t>(i);
                stream.upload(dx.ptr(), x0.data(), n * 4);
                stream.fill_u32(flag.ptr(), 0, 1);
                stream.unclip_step(a);
                std::vector<float> got(n);
                stream.download(got.data(), dx.ptr(), n * 4);
                stream.download(&bad, flag.ptr(), 4);
                stream.synchronize();
                std::vector<float> want = x0, eps(n), var(n);
                for (int64_t k = 0; k < n; ++k) {  // the chain's guidance, row by row
                    const int64_t b = k / (C * plane), within = k % (C * plane), cond = (cfg ? B + b : b) * pc * plane;
                    const float u = pred[static_cast<size_t>(b * pc * plane + within)], c = pred[static_cast<size_t>(cond + within)];
                    eps[k] = cfg ? u + a.scale * (c - u) : c;
                    if (sched.learned()) var[k] = pred[static_cast<size_t>(cond + C * plane + within)];
                }
                sched.step(eps.data(), sched.learned() ? var.data() : nullptr, t, sched.prev_timestep(i), want.data(), nz.data(), n);
                for (int64_t k = 0; k < n; ++k) {
                    int32_t gi, wi;
                    std::memcpy(&gi, &got[k], 4), std::memcpy(&wi, &want[k], 4);
                    const int64_t ulps = std::llabs(static_cast<int64_t>(gi) - wi);
                    max_ulps = std::max(max_ulps, ulps);
                    mismatches += ulps != 0;
                }
            }
            const bool case_ok = bad == 0 && max_ulps <= (sched.learned() ? 1 : 0);
            ok = ok && case_ok;
            cases.push_back({{"variance", variance}, {"cfg", cfg}, {"mismatches", mismatches}, {"max_ulps", max_ulps}, {"ok", case_ok}});
        }
        return json{{"ok", ok}, {"cases", cases}};
    });

    // b. the backend's device loop with the stand-in UNet vs the host loop
    check("device loop", [&] {
        const ContextGuard guard(*gpu.driver, gpu.context);
        KernelUnet unet(gpu, stream);
        std::vector<std::string> warnings;
        Binding binding(stream, unet, BindingOptions{"unet", true, "", "rebuild", &warnings});
        LoopBuffers loop(stream);
        json runs = json::array();
        bool ok = true;
        auto run = [&](const std::string &what, Request r, int captures, bool same_sample_address) {
            r.make();
            const DevicePtr sample_before = binding.counters().rebinds ? binding.ptr("sample") : 0;
            std::vector<float> got;
            const bool done = denoise_on_device(stream, binding, loop, r.call(got));
            json c = compare(got, r.host_loop());
            const auto &k = binding.counters();
            const bool addr_ok = !same_sample_address || binding.ptr("sample") == sample_before;
            const bool run_ok = done && c["mismatches"] == 0 && k.captures == captures && addr_ok && warnings.empty();
            c.update({{"run", what}, {"plain_enqueues", k.plain_enqueues}, {"captures", k.captures},
                      {"graph_launches", k.graph_launches}, {"rebinds", k.rebinds}, {"ok", run_ok}});
            ok = ok && run_ok;
            runs.push_back(c);
        };
        Request first;
        run("CFG, noise, clip 1: one plain enqueue, captured, replayed", first, 1, false);
        run("the same request again: replayed from step 0, same buffers", first, 1, true);
        Request no_cfg = first;
        no_cfg.cfg = false, no_cfg.noise = false, no_cfg.clip = std::numeric_limits<float>::infinity();
        run("no CFG, no noise, clip inf: fewer rows, buffers kept, re-captured", no_cfg, 2, true);
        Request larger = first;
        larger.h = 64, larger.w = 48;
        run("larger latents: grown buffers, re-captured", larger, 3, false);
        const auto &k = binding.counters();
        const bool replay_ok = k.graph_launches == (first.steps - 1) + first.steps + (no_cfg.steps - 1) + (larger.steps - 1);
        ok = ok && replay_ok;
        return json{{"ok", ok}, {"runs", runs}, {"graph_launches_total_ok", replay_ok}};
    });

    check("device loop without CUDA graphs", [&] {
        const ContextGuard guard(*gpu.driver, gpu.context);
        KernelUnet unet(gpu, stream);
        Binding binding(stream, unet, BindingOptions{"unet", false, "", "rebuild"});
        LoopBuffers loop(stream);
        Request r;
        r.make();
        std::vector<float> got;
        denoise_on_device(stream, binding, loop, r.call(got));
        json c = compare(got, r.host_loop());
        c["ok"] = c["mismatches"] == 0 && binding.counters().plain_enqueues == r.steps && binding.counters().captures == 0;
        return c;
    });

    // the caller's context (none, here) is current again after every library entry
    CUcontext after = reinterpret_cast<CUcontext>(uintptr_t{1});
    {
        const ContextGuard guard(*gpu.driver, gpu.context);
        gpu.driver->ModuleUnload(gpu.unet_module);
    }
    get_current(&after);
    check("caller context kept", [&] { return json{{"ok", after == before}, {"before_is_null", before == nullptr}}; });
    out["checks"] = g_checks;
    out["ok"] = g_ok;
    out["seconds"] = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    const std::string text = out.dump();
    std::printf("%s\n", text.c_str());
    if (argc > 2) std::ofstream(argv[2]) << out.dump(1) << "\n";
    return g_ok ? 0 : 1;
}
