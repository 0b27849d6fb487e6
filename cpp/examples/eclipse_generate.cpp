// eclipse-generate-cpp: the Python CLI's main flags over the C++ wrapper.
//   eclipse-generate-cpp --bundle engines/tiny-onnx --prompt "a red cube" --seed 0 --out out.png
//   eclipse-generate-cpp --bundle engines/lambda-onnx --prompt "a dog on the beach" --subject dog.png=dog
// User mistakes: one "error:" line and exit status 2; other failures exit 1.
#include <algorithm>
#include <cerrno>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <map>
#include <optional>
#include <string>
#include <vector>

#include "eclipse/eclipse.hpp"

namespace {

struct UsageError : std::runtime_error {
    using std::runtime_error::runtime_error;
};

const char *kUsage =
    "usage: eclipse-generate-cpp --bundle DIR --prompt TEXT [--negative-prompt TEXT] [--height N] [--width N]\n"
    "                            [--steps N] [--guidance S] [--seed N] [--scheduler ddpm|ddim] [--out FILE.png]\n"
    "                            [--backend auto|onnxruntime|tensorrt|tensorrt-rtx] [--provider cpu|cuda]... [--threads N]\n"
    "                            [--low-memory] [--no-cuda-graphs] [--device N] [--skip-hash-check]\n"
    "                            [--subject IMAGE.png=KEYWORD]... [--control-image EDGES.png]  (λ-ECLIPSE bundles)\n";

long long to_int(const std::string &flag, const std::string &v) {
    char *end = nullptr;
    errno = 0;
    const long long x = std::strtoll(v.c_str(), &end, 10);
    if (errno || end == v.c_str() || *end) throw UsageError(flag + " wants an integer, got '" + v + "'");
    return x;
}

}  // namespace

int main(int argc, char **argv) {
    try {
        // --height/--width/--steps/--guidance default to the bundle family's (eclipse::default_params)
        std::map<std::string, std::string> opt{{"--seed", "0"}, {"--out", "out.png"},
                                               {"--backend", "auto"}, {"--threads", "0"}, {"--device", "0"}};
        std::string providers;
        std::vector<eclipse::Subject> subjects;
        std::optional<std::string> control;
        bool verify = true, has_negative = false, low_memory = false, cuda_graphs = true;
        for (int i = 1; i < argc; ++i) {
            const std::string a = argv[i];
            if (a == "-h" || a == "--help") {
                std::fputs(kUsage, stdout);
                return 0;
            }
            if (a == "--skip-hash-check" || a == "--low-memory" || a == "--no-cuda-graphs") {
                verify = verify && a != "--skip-hash-check";
                low_memory = low_memory || a == "--low-memory";
                cuda_graphs = cuda_graphs && a != "--no-cuda-graphs";
                continue;
            }
            static const char *kFlags[] = {"--bundle", "--prompt", "--negative-prompt", "--height", "--width", "--steps",
                                           "--guidance", "--seed", "--scheduler", "--out", "--backend", "--provider", "--threads",
                                           "--device", "--subject", "--control-image", "--control", "--canny"};
            bool known = false;
            for (const char *f : kFlags) known = known || a == f;
            if (!known) throw UsageError("unknown argument " + a);
            if (i + 1 >= argc) throw UsageError(a + " needs a value");
            const std::string v = argv[++i];
            if (a == "--provider") providers += (providers.empty() ? "" : ",") + v;
            else if (a == "--subject") {  // IMAGE=KEYWORD, split at the last '=' as eclipse-generate does
                const size_t eq = v.rfind('=');
                const bool blank = eq == std::string::npos ||
                                   v.find_first_not_of(" \t\n\r\f\v", eq + 1) == std::string::npos;
                if (eq == std::string::npos || eq == 0 || blank)
                    throw UsageError("--subject '" + v + "': expected IMAGE=KEYWORD, e.g. --subject dog.png=dog");
                subjects.push_back({eclipse::Image::file(v.substr(0, eq)), v.substr(eq + 1)});
            } else if (a == "--control-image" || a == "--control") {
                if (control) throw UsageError("--control-image is given twice");
                control = v;
            } else if (a == "--canny")
                throw UsageError("--canny: Canny edges are computed by the Python runtime only (OpenCV); pass an edge "
                                 "image with --control-image (eclipse-generate --canny makes one)");
            else opt[a] = v;
            has_negative = has_negative || a == "--negative-prompt";
        }
        for (const char *required : {"--bundle", "--prompt"}) {
            if (!opt.count(required)) throw UsageError(std::string(required) + " is required");
        }
        const std::string out = opt["--out"];
        if (out.size() < 4 || out.compare(out.size() - 4, 4, ".png") != 0) throw UsageError("--out must be a .png file, got " + out);
        eclipse::Params p;
        if (has_negative) p.negative_prompt = opt["--negative-prompt"];
        std::optional<int32_t> height, width, steps;
        std::optional<double> guidance;
        if (opt.count("--height")) height = static_cast<int32_t>(to_int("--height", opt["--height"]));
        if (opt.count("--width")) width = static_cast<int32_t>(to_int("--width", opt["--width"]));
        if (opt.count("--steps")) steps = static_cast<int32_t>(to_int("--steps", opt["--steps"]));
        char *end = nullptr;
        if (opt.count("--guidance")) {
            guidance = std::strtod(opt["--guidance"].c_str(), &end);
            if (*end || end == opt["--guidance"].c_str()) throw UsageError("--guidance wants a number, got '" + opt["--guidance"] + "'");
        }
        const std::string seed = opt["--seed"];
        errno = 0;
        p.seed = std::strtoull(seed.c_str(), &end, 10);
        if (errno || *end || seed.empty() || seed[0] == '-') throw UsageError("--seed must be an integer between 0 and 2**64 - 1");
        if (opt.count("--scheduler")) {
            const std::string s = opt["--scheduler"];
            if (s != "ddpm" && s != "ddim") throw UsageError("--scheduler must be ddpm or ddim");
            p.scheduler = s == "ddpm" ? ECLIPSE_SCHEDULER_DDPM : ECLIPSE_SCHEDULER_DDIM;
        }
        const std::string backend_name = opt["--backend"];
        const char *trt = eclipse_tensorrt_flavour();  // the one TensorRT flavour this library was built for
        const bool use_trt = backend_name == "tensorrt" || backend_name == "tensorrt-rtx";
        if (backend_name != "auto" && backend_name != "onnxruntime" && !use_trt)
            throw UsageError("--backend must be auto, onnxruntime, tensorrt or tensorrt-rtx, got " + backend_name);
        if (use_trt && (trt == nullptr || backend_name != trt))
            throw UsageError("--backend " + backend_name + ": this eclipse library was built " +
                             (trt ? "with the " + std::string(trt) + " backend only" : std::string("without a TensorRT backend")) +
                             " (README: Embedding in C/C++)");
        if (!use_trt && (low_memory || !cuda_graphs))
            throw UsageError("--low-memory and --no-cuda-graphs are for --backend tensorrt / tensorrt-rtx");
        if (use_trt && !providers.empty()) throw UsageError("--provider is for --backend onnxruntime");
        const int device = static_cast<int>(to_int("--device", opt["--device"]));
        p.progress = [](int i, int n) {
            if (i == n || i % std::max(1, n / 10) == 0) std::fprintf(stderr, "  step %d/%d\n", i, n);
            return true;
        };

        p.subjects = subjects;
        if (control) p.control_image = eclipse::Image::file(*control);
        const eclipse::Bundle bundle(opt["--bundle"], verify);
        const eclipse::Params defaults = eclipse::default_params(bundle);
        p.height = height.value_or(defaults.height), p.width = width.value_or(defaults.width);
        p.steps = steps.value_or(defaults.steps), p.guidance_scale = guidance.value_or(defaults.guidance_scale);
        const eclipse::Backend backend =
            use_trt ? eclipse::Backend::tensorrt(low_memory, cuda_graphs, device)
                    : eclipse::Backend::onnxruntime(providers.empty() ? "cpu" : providers,
                                                    static_cast<int>(to_int("--threads", opt["--threads"])), device);
        const eclipse::Context context(bundle, backend);
        eclipse::State state(context);
        const eclipse::Result result = state.generate(opt["--prompt"], p);
        result.save_png(out);
        std::fprintf(stderr, "wrote %s\nlatency:", out.c_str());
        for (const char *stage : {"text_encoder", "image_encoder", "prior", "unet", "unet_per_step", "movq", "text_proj",
                                  "decoder", "super_res", "total"})
            if (result.timing(stage) >= 0) std::fprintf(stderr, " %s %.1f ms ", stage, result.timing(stage) * 1000);
        std::fprintf(stderr, "\n");
        return 0;
    } catch (const UsageError &e) {
        std::fprintf(stderr, "%serror: %s\n", kUsage, e.what());
        return 2;
    } catch (const eclipse::Error &e) {
        std::fprintf(stderr, "error: %s\n", e.what());
        const auto s = e.status();
        return s == ECLIPSE_ERR_INVALID_ARGUMENT || s == ECLIPSE_ERR_BUNDLE || s == ECLIPSE_ERR_UNSUPPORTED ||
                       s == ECLIPSE_ERR_IO
                   ? 2
                   : 1;
    }
}
