// C++ tests of the core's self-contained parts (CTest; also run under ASan + UBSan). The
// comparisons with the Python runtime (tokenizer, scheduler, noises, whole chain, bundle
// refusals) are in tests/test_cpp_runtime.py, through the C API.
#include <png.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cmath>
#include <cstddef>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <functional>
#include <string>
#include <vector>

#include "check.hpp"
#include "eclipse/eclipse.hpp"
#include "core/bundle.hpp"
#include "eclipse/eclipse.h"
#include "core/noise.hpp"
#include "core/npy.hpp"
#include "core/onnx_refs.hpp"
#include "core/pipeline.hpp"
#include "core/scheduler.hpp"

namespace fs = std::filesystem;
using namespace eclipse::core;
using namespace eclipse::test;

namespace {


template <class F>
eclipse_status status_of(F &&f) {
    try {
        f();
    } catch (const Error &e) {
        return e.status;
    }
    return ECLIPSE_OK;
}

fs::path temp_dir(const std::string &name) {
    fs::path d = fs::temp_directory_path() / ("eclipse-test-" + name + "-" + std::to_string(::getpid()));
    fs::remove_all(d);
    fs::create_directories(d);
    return d;
}

void write(const fs::path &p, const std::string &bytes) {
    std::ofstream(p, std::ios::binary) << bytes;
}

std::string npy_bytes(const std::string &descr, const std::string &shape, const std::string &data, bool fortran = false) {
    std::string header = "{'descr': '" + descr + "', 'fortran_order': " + (fortran ? "True" : "False") + ", 'shape': (" + shape + "), }";
    while ((10 + header.size() + 1) % 64) header += ' ';
    header += '\n';
    std::string out("\x93NUMPY\x01\x00", 8);
    out += static_cast<char>(header.size() & 0xFF);
    out += static_cast<char>(header.size() >> 8);
    return out + header + data;
}

// protobuf wire format, for hand-made graphs
std::string varint(uint64_t v) {
    std::string out;
    do {
        out += static_cast<char>((v & 0x7F) | (v > 0x7F ? 0x80 : 0));
        v >>= 7;
    } while (v);
    return out;
}
std::string bytes_field(uint64_t number, const std::string &payload) { return varint(number << 3 | 2) + varint(payload.size()) + payload; }
std::string int_field(uint64_t number, uint64_t v) { return varint(number << 3) + varint(v); }
std::string entry(const std::string &key, const std::string &value) { return bytes_field(13, bytes_field(1, key) + bytes_field(2, value)); }
// TensorProto with external data (name 8, external_data 13, data_location 14 = EXTERNAL)
std::string external_tensor(const std::string &name, const std::string &location, const std::string &extra = "") {
    return bytes_field(8, name) + entry("location", location) + entry("offset", "64") + entry("length", "16") + extra + int_field(14, 1);
}

std::vector<ExternalRef> refs_of(const std::string &bytes) {
    return external_data_refs(reinterpret_cast<const uint8_t *>(bytes.data()), bytes.size());
}

template <class F>
bool refused(F &&f) {
    try {
        f();
    } catch (const OnnxRefsError &) {
        return true;
    }
    return false;
}

// `eclipse_tests --onnx-refs FILE...`: each file's references as one JSON line, for
// tests/test_onnx_refs.py to compare with the onnx package's reading of the same graphs.
int print_refs(int argc, char **argv) {
    for (int i = 2; i < argc; ++i) {
        nlohmann::json line = {{"file", argv[i]}};
        try {
            nlohmann::json refs = nlohmann::json::array();
            for (const auto &r : external_data_refs(fs::path(argv[i]))) {
                refs.push_back({r.tensor, r.location, r.offset, r.has_length ? nlohmann::json(r.length) : nlohmann::json()});
            }
            line["refs"] = refs;
        } catch (const std::exception &e) {
            line["error"] = e.what();
        }
        std::printf("%s\n", line.dump(-1, ' ', false, nlohmann::json::error_handler_t::replace).c_str());
    }
    return 0;
}

}  // namespace

int main(int argc, char **argv) {
    if (argc > 1 && std::string(argv[1]) == "--onnx-refs") return print_refs(argc, argv);

    run("ONNX external-data references: initializers, attribute tensors, subgraphs, functions", [] {
        const std::string sub = bytes_field(5, external_tensor("s", "sub.bin"));  // a subgraph's initializer
        const std::string node = bytes_field(5, bytes_field(1, "value") + bytes_field(5, external_tensor("t", "t.bin")) +
                                                    bytes_field(6, sub) + bytes_field(10, bytes_field(8, "inline") + bytes_field(9, std::string(100, 'x'))));
        const std::string graph = bytes_field(5, external_tensor("w", "w.bin")) + bytes_field(1, node) + bytes_field(2, "g");
        const std::string function = bytes_field(7, bytes_field(5, bytes_field(5, external_tensor("f", "f.bin"))));
        const std::string model = int_field(1, 8) + bytes_field(7, graph) + bytes_field(25, function);
        const auto refs = refs_of(model);
        EXPECT(refs.size() == 4);
        EXPECT(refs[0].tensor == "w" && refs[0].location == "w.bin" && refs[0].offset == 64 && refs[0].has_length && refs[0].length == 16);
        EXPECT(refs[1].tensor == "t" && refs[2].tensor == "s" && refs[3].location == "f.bin");
        EXPECT(refs_of(int_field(1, 8)).empty() && refs_of("").empty());
        // no length: to the end of the file
        const auto open = refs_of(bytes_field(7, bytes_field(5, bytes_field(8, "x") + entry("location", "a") + int_field(14, 1))));
        EXPECT(open.size() == 1 && !open[0].has_length && open[0].offset == 0);
        // a location without data_location EXTERNAL still counts (stricter than the loaders)
        EXPECT(refs_of(bytes_field(7, bytes_field(5, entry("location", "../x")))).size() == 1);
        // data_location is a closed enum read as int32: 2^32 + 1 is EXTERNAL
        EXPECT(refused([&] { refs_of(bytes_field(7, bytes_field(5, int_field(14, (uint64_t{1} << 32) + 1)))); }));
    });

    run("ONNX external-data references: malformed files are refused, never followed", [] {
        const std::string good = bytes_field(7, bytes_field(5, external_tensor("w", "w.bin")));
        EXPECT(refused([&] { refs_of(good.substr(0, good.size() - 3)); }));                   // truncated
        EXPECT(refused([&] { refs_of(std::string(11, '\xff')); }));                          // varint of 11 bytes
        EXPECT(refused([&] { refs_of(varint(7 << 3 | 2) + varint(1000) + "x"); }));          // length past the end
        EXPECT(refused([&] { refs_of(varint(7 << 3 | 3)); }));                                // a group
        EXPECT(refused([&] { refs_of(varint(7 << 3 | 6) + "x"); }));                          // no such wire type
        EXPECT(refused([&] { refs_of(bytes_field(7, bytes_field(5, entry("location", "a") + entry("location", "b")))); }));
        EXPECT(refused([&] { refs_of(bytes_field(7, bytes_field(5, entry("offset", "1") + int_field(14, 1)))); }));  // no location
        for (const char *bad : {"a\xff", "\xed\xa0\x80", "\xc0\xae", "\xf4\x90\x80\x80", "\xe2\x82"}) {  // not UTF-8
            EXPECT(refused([&] { refs_of(bytes_field(7, bytes_field(5, entry("location", bad)))); }));
        }
        EXPECT(refs_of(bytes_field(7, bytes_field(5, entry("location", "caf\xc3\xa9 \xf0\x9f\x90\xb1"))))[0].location == "caf\xc3\xa9 \xf0\x9f\x90\xb1");
        for (const char *bad : {"-1", "+1", " 1", "1e3", "", "99999999999999999999"}) {
            EXPECT(refused([&] { refs_of(bytes_field(7, bytes_field(5, entry("location", "a") + entry("offset", bad)))); }));
        }
        std::string deep = bytes_field(5, external_tensor("deep", "d.bin"));  // 40 nested subgraphs (protobuf: 100 levels)
        for (int i = 0; i < 40; ++i) deep = bytes_field(1, bytes_field(5, bytes_field(6, deep)));
        EXPECT(refused([&] { refs_of(bytes_field(7, deep)); }));
        // every truncation and every single-byte change: references or a refusal, never a crash
        const std::string model = int_field(1, 8) + bytes_field(7, bytes_field(5, external_tensor("w", "w.bin")) +
                                                                     bytes_field(1, bytes_field(5, bytes_field(6, good))));
        for (size_t n = 0; n <= model.size(); ++n) {
            try { refs_of(model.substr(0, n)); } catch (const OnnxRefsError &) {}
        }
        for (size_t i = 0; i < model.size(); ++i) {
            for (int v : {0x00, 0x7f, 0x80, 0xff, model[i] ^ 0x08}) {
                std::string m = model;
                m[i] = static_cast<char>(v);
                try { refs_of(m); } catch (const OnnxRefsError &) {}
            }
        }
    });

    run("philox4x64-10 gives Random123's known-answer vectors", [] {
        const uint64_t M = ~0ULL;
        EXPECT((philox4x64_10({0, 0, 0, 0}, {0, 0}) ==
                PhiloxBlock{0x16554D9ECA36314CULL, 0xDB20FE9D672D0FDCULL, 0xD7E772CEE186176BULL, 0x7E68B68AEC7BA23BULL}));
        EXPECT((philox4x64_10({M, M, M, M}, {M, M}) ==
                PhiloxBlock{0x87B092C3013FE90BULL, 0x438C3C67BE8D0224ULL, 0x9CC7D7C69CD777B6ULL, 0xA09CAEBF594F0BA0ULL}));
        EXPECT((philox4x64_10({0x243F6A8885A308D3ULL, 0x13198A2E03707344ULL, 0xA4093822299F31D0ULL, 0x082EFA98EC4E6C89ULL},
                              {0x452821E638D01377ULL, 0xBE5466CF34E90C6CULL}) ==
                PhiloxBlock{0xA528F45403E61D95ULL, 0x38C72DBD566E9788ULL, 0xA5A1610E72FD18B5ULL, 0x57BD43B5E52B7FE6ULL}));
    });

    run("normals: standard, prefix-stable, streams differ", [] {
        std::vector<float> a(200001), b(7), c(7);
        standard_normal(5, 2, a.data(), a.size());
        double sum = 0, sq = 0;
        for (float x : a) sum += x, sq += double(x) * x;
        const double mean = sum / a.size(), var = sq / a.size() - mean * mean;
        EXPECT(std::fabs(mean) < 0.01 && std::fabs(var - 1) < 0.01);
        standard_normal(5, 2, b.data(), b.size());  // odd count: the last sine is dropped
        for (size_t i = 0; i < b.size(); ++i) EXPECT(a[i] == b[i]);
        standard_normal(5, 1, c.data(), c.size());
        EXPECT(c[0] != b[0]);
    });

    run("sha256 of a file (FIPS 180 'abc' vector)", [] {
        const fs::path d = temp_dir("sha");
        write(d / "abc", "abc");
        EXPECT(sha256_file(d / "abc") == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad");
        fs::remove_all(d);
    });

    run(".npy: float32/float64 read, others refused", [] {
        const float f[3] = {1.5f, -2.0f, 0.25f};
        NpyArray a = parse_npy(npy_bytes("<f4", "1, 3", std::string(reinterpret_cast<const char *>(f), 12)), "x.npy");
        EXPECT((a.shape == std::vector<int64_t>{1, 3}) && a.data[0] == 1.5f && a.data[2] == 0.25f);
        const double d[2] = {0.1, 3.0};
        NpyArray b = parse_npy(npy_bytes("<f8", "2,", std::string(reinterpret_cast<const char *>(d), 16)), "x.npy");
        EXPECT(b.shape.size() == 1 && b.data[0] == 0.1f && b.data[1] == 3.0f);
        EXPECT(status_of([&] { parse_npy(npy_bytes("<i8", "1,", std::string(8, '\0')), "x.npy"); }) == ECLIPSE_ERR_BUNDLE);
        EXPECT(status_of([&] { parse_npy(npy_bytes("<f4", "2, 2", std::string(16, '\0'), true), "x.npy"); }) == ECLIPSE_ERR_BUNDLE);
        EXPECT(status_of([&] { parse_npy(npy_bytes("<f4", "1, 3", std::string(8, '\0')), "x.npy"); }) == ECLIPSE_ERR_BUNDLE);
        EXPECT(status_of([&] { parse_npy("not an array", "x.npy"); }) == ECLIPSE_ERR_BUNDLE);
    });

    run("scheduler: Kandinsky's DDPM config, spacings, refusals", [] {
        const nlohmann::json k22 = {{"_class_name", "DDPMScheduler"}, {"beta_start", 0.00085}, {"beta_end", 0.012},
                                    {"clip_sample", false}, {"steps_offset", 1}, {"timestep_spacing", "leading"}};
        Scheduler s(k22, "");
        s.set_timesteps(50);
        EXPECT(s.timesteps().size() == 50 && s.timesteps().front() == 981 && s.timesteps().back() == 1);
        EXPECT(s.needs_noise());
        std::vector<float> x{0.5f, -0.25f}, eps{0.1f, 0.2f}, noise{1.0f, -1.0f};
        s.step(eps.data(), 981, x.data(), noise.data(), 2);
        EXPECT(std::isfinite(x[0]) && x[0] != 0.5f);
        for (const char *spacing : {"linspace", "trailing"}) {
            nlohmann::json c = k22;
            c["timestep_spacing"] = spacing;
            Scheduler t(c, "ddim");
            t.set_timesteps(7);
            EXPECT(t.timesteps().size() == 7 && t.timesteps().front() == 999 && !t.needs_noise());
        }
        EXPECT(status_of([&] { s.set_timesteps(0); }) == ECLIPSE_ERR_INVALID_ARGUMENT);
        EXPECT(status_of([&] { s.set_timesteps(1000); }) == ECLIPSE_ERR_INVALID_ARGUMENT);  // leading + offset reaches 1000
        for (const auto &[key, value] : std::vector<std::pair<std::string, nlohmann::json>>{
                 {"thresholding", true}, {"variance_type", "fixed_large_log"}, {"beta_schedule", "sigmoid"},
                 {"prediction_type", "x"}, {"_class_name", "EulerDiscreteScheduler"}}) {
            nlohmann::json c = k22;
            c[key] = value;
            EXPECT(status_of([&] { Scheduler bad(c, ""); }) == ECLIPSE_ERR_UNSUPPORTED);
        }
    });

    run("engine entries: version and compute capability as engines.check_engine_compatible", [] {
        const nlohmann::json e = {{"flavour", "tensorrt-rtx"}, {"version", "1.7.1.116"},
                                  {"compute_capabilities", {"SM86", "SM89", "unknown"}}};
        EXPECT(engine_problems(e, "1.7.1.116", "SM89").empty());
        EXPECT(engine_problems(e, "1.7.1.116", "").empty());
        EXPECT((engine_problems(e, "", "SM89") == std::vector<std::string>{"tensorrt_rtx is not installed"}));
        EXPECT((engine_problems(e, "1.6.1.120", "SM120") ==
                std::vector<std::string>{"built with tensorrt-rtx 1.7.1.116, this machine has 1.6.1.120",
                                         "built for SM86, SM89, this GPU is SM120"}));
        const nlohmann::json any = {{"flavour", "tensorrt"}, {"version", "10.3.0"}, {"compute_capabilities", {"unknown"}}};
        EXPECT(engine_problems(any, "10.3.0", "SM87").empty());
    });

    run("PNG: written atomically and read back pixel for pixel", [] {
        const fs::path d = temp_dir("png");
        std::vector<uint8_t> px(5 * 3 * 3);
        for (size_t i = 0; i < px.size(); ++i) px[i] = static_cast<uint8_t>(i * 7);
        save_png((d / "x.png").string(), px.data(), 5, 3);
        png_image img{};
        img.version = PNG_IMAGE_VERSION;
        EXPECT(png_image_begin_read_from_file(&img, (d / "x.png").c_str()));
        img.format = PNG_FORMAT_RGB;
        std::vector<uint8_t> back(PNG_IMAGE_SIZE(img));
        EXPECT(png_image_finish_read(&img, nullptr, back.data(), 0, nullptr));
        EXPECT(img.width == 5 && img.height == 3 && back == px);
        {  // the ordinary mode of a new file (0666 less the umask), not mkstemp's 0600
            const mode_t mask = umask(022);
            save_png((d / "m.png").string(), px.data(), 5, 3);
            umask(mask);
            EXPECT((fs::status(d / "m.png").permissions() & fs::perms::all) ==
                   (fs::perms::owner_read | fs::perms::owner_write | fs::perms::group_read | fs::perms::others_read));
            fs::remove(d / "m.png");
        }
        EXPECT(status_of([&] { save_png((d / "missing" / "x.png").string(), px.data(), 5, 3); }) == ECLIPSE_ERR_IO);
        size_t files = 0;
        for (const auto &entry : fs::directory_iterator(d)) files += entry.is_regular_file() ? 1 : 0;
        EXPECT(files == 1);  // no temporary left behind
        fs::remove_all(d);
    });

    run("C API: NULLs, bad params and a missing bundle give a status and a message", [] {
        eclipse_bundle *b = reinterpret_cast<eclipse_bundle *>(1);
        EXPECT(eclipse_bundle_open("/nonexistent/bundle", 1, &b) == ECLIPSE_ERR_BUNDLE && b == nullptr);
        EXPECT(std::string(eclipse_last_error()).find("does not exist") != std::string::npos);
        EXPECT(eclipse_bundle_open(nullptr, 1, &b) == ECLIPSE_ERR_INVALID_ARGUMENT);
        eclipse_result *r = nullptr;
        eclipse_params p = eclipse_default_params();
        EXPECT(p.struct_size == sizeof(p) && p.width == 512 && p.steps == 50 && p.guidance_scale == 4.0);
        EXPECT(eclipse_generate(nullptr, "x", &p, &r) == ECLIPSE_ERR_INVALID_ARGUMENT);
        eclipse_custom_backend table{};
        eclipse_backend *backend = nullptr;
        EXPECT(eclipse_backend_custom_create(&table, &backend) == ECLIPSE_ERR_INVALID_ARGUMENT);  // no struct_size
        table.struct_size = sizeof(table);
        EXPECT(eclipse_backend_custom_create(&table, &backend) == ECLIPSE_ERR_INVALID_ARGUMENT);  // no functions
        EXPECT(std::string(eclipse_last_error()).find("load and run") != std::string::npos);
        EXPECT(eclipse_backend_available("custom") == 1 && eclipse_backend_available("nope") == 0);
        if (!eclipse_backend_available("onnxruntime")) {
            EXPECT(eclipse_backend_onnxruntime_create(nullptr, &backend) == ECLIPSE_ERR_UNSUPPORTED);
        }
        EXPECT(std::string(eclipse_status_string(ECLIPSE_ERR_CANCELLED)) == "cancelled");
    });

    run("C API: only released struct sizes and known enum values are accepted (issue 19, item 9)", [] {
        // today's layouts, frozen: a caller compiled against this eclipse.h must keep working
        // after the header grows (the library copies its struct_size bytes, defaults the rest)
        struct params_v1 {
            uint32_t struct_size, api_version;
            const char *negative_prompt;
            int32_t width, height, steps;
            double guidance_scale;
            uint64_t seed;
            int32_t scheduler;
            eclipse_progress_fn progress;
            void *progress_data;
            const float *prior_noise;
            size_t prior_noise_count;
            const float *latent_noise;
            size_t latent_noise_count;
            const float *step_noise;
            size_t step_noise_count;
        };
        struct onnxruntime_options_v0 {  // the first C API: no library_path
            uint32_t struct_size;
            const char *providers;
            int32_t intra_op_threads, device_id;
        };
        struct params_v2 {  // API 2: API 1's fields, then λ-ECLIPSE subjects, control image, named noises
            params_v1 v1;
            const eclipse_subject *subjects;
            size_t subject_count;
            const eclipse_image *control_image;
            const eclipse_noise *noises;
            size_t noise_count;
        };
        static_assert(offsetof(eclipse_params, subjects) == sizeof(params_v1), "API 1's layout must stay a prefix");
        static_assert(offsetof(eclipse_params, step_noise_count) == offsetof(params_v1, step_noise_count), "layout");
        static_assert(sizeof(params_v2) == sizeof(eclipse_params), "eclipse_params grew: add params_v3, keep v1 and v2");
        static_assert(offsetof(eclipse_params, noise_count) == offsetof(params_v2, noise_count), "layout");
        eclipse_result *r = nullptr;
        eclipse_params p = eclipse_default_params();
        eclipse_state *state = reinterpret_cast<eclipse_state *>(&p);  // never reached: params are checked first
        params_v1 v1{};
        const eclipse_params defaults = eclipse_default_params();
        std::memcpy(&v1, &defaults, sizeof v1);
        v1.struct_size = sizeof v1;
        v1.scheduler = 99;  // the size is accepted: the refusal is the next check's
        EXPECT(eclipse_generate(state, "x", reinterpret_cast<const eclipse_params *>(&v1), &r) ==
               ECLIPSE_ERR_INVALID_ARGUMENT);
        EXPECT(std::string(eclipse_last_error()).find("scheduler 99") != std::string::npos);
        for (uint32_t bad : {0u, 4u, 12u, 16u, uint32_t(sizeof(params_v1) + 8), uint32_t(sizeof(p) - 8), uint32_t(sizeof(p) + 8)}) {
            p.struct_size = bad;
            EXPECT(eclipse_generate(state, "x", &p, &r) == ECLIPSE_ERR_INVALID_ARGUMENT && r == nullptr);
            EXPECT(std::string(eclipse_last_error()).find("not the size of any released eclipse_params") !=
                   std::string::npos);
        }
        p = eclipse_default_params();
        p.api_version = 0;
        EXPECT(eclipse_generate(state, "x", &p, &r) == ECLIPSE_ERR_INVALID_ARGUMENT);
        EXPECT(std::string(eclipse_last_error()).find("api_version is 0") != std::string::npos);
        p = eclipse_default_params();
        const int32_t ninety_nine = 99;
        std::memcpy(&p.scheduler, &ninety_nine, sizeof ninety_nine);  // as a C caller can
        EXPECT(eclipse_generate(state, "x", &p, &r) == ECLIPSE_ERR_INVALID_ARGUMENT);
        EXPECT(std::string(eclipse_last_error()).find("scheduler 99 is not an eclipse_scheduler") != std::string::npos);

        eclipse_backend *backend = nullptr;
        eclipse_onnxruntime_options o = eclipse_onnxruntime_default_options();
        o.struct_size = 12;  // between two fields: half of `providers`
        EXPECT(eclipse_backend_onnxruntime_create(&o, &backend) == ECLIPSE_ERR_INVALID_ARGUMENT && backend == nullptr);
        EXPECT(std::string(eclipse_last_error()).find("not the size of any released") != std::string::npos);
        if (eclipse_backend_available("onnxruntime")) {
            onnxruntime_options_v0 v0{sizeof(onnxruntime_options_v0), "cpu", 1, 0};
            EXPECT(eclipse_backend_onnxruntime_create(reinterpret_cast<const eclipse_onnxruntime_options *>(&v0),
                                                      &backend) == ECLIPSE_OK);
            eclipse_backend_free(backend);
        }
        {  // checked before the backend is made, with or without ONNX Runtime built in
            eclipse_onnxruntime_options e = eclipse_onnxruntime_default_options();
            e.providers = "";
            EXPECT(eclipse_backend_onnxruntime_create(&e, &backend) == ECLIPSE_ERR_INVALID_ARGUMENT);
            EXPECT(std::string(eclipse_last_error()).find("providers is empty") != std::string::npos);
            e = eclipse_onnxruntime_default_options();
            e.intra_op_threads = -1;
            EXPECT(eclipse_backend_onnxruntime_create(&e, &backend) == ECLIPSE_ERR_INVALID_ARGUMENT);
            EXPECT(std::string(eclipse_last_error()).find("is negative") != std::string::npos);
        }
        // the C++ wrapper passes the ONNX Runtime library to open (issue 19, item 11)
        try {
            eclipse::Backend::onnxruntime("cpu", 0, 0, "/nonexistent/libonnxruntime.so.1");
            EXPECT(false);
        } catch (const eclipse::Error &e) {
            const std::string message = e.what();
            EXPECT(eclipse_backend_available("onnxruntime") ? message.find("/nonexistent/libonnxruntime.so.1") != std::string::npos
                                                            : e.status() == ECLIPSE_ERR_UNSUPPORTED);
        }
        eclipse_custom_backend table{};
        table.struct_size = 12;
        EXPECT(eclipse_backend_custom_create(&table, &backend) == ECLIPSE_ERR_INVALID_ARGUMENT);
        EXPECT(std::string(eclipse_last_error()).find("not the size of a released") != std::string::npos);
    });

    run("C API 2: subject/control images, keywords and named noises are checked before any work (issue 19)", [] {
        // the state is never reached: every case is refused while the request is read
        eclipse_params base = eclipse_default_params();
        eclipse_state *state = reinterpret_cast<eclipse_state *>(&base);
        const fs::path d = temp_dir("api2");
        write(d / "empty.png", "");
        write(d / "text.png", "not an image");
        auto refused = [&](const eclipse_params &p, const std::string &words) {
            eclipse_result *r = nullptr;
            const eclipse_status s = eclipse_generate(state, "a dog", &p, &r);
            const std::string message = eclipse_last_error();
            EXPECT(s == ECLIPSE_ERR_INVALID_ARGUMENT && r == nullptr && message.find('\n') == std::string::npos);
            if (message.find(words) == std::string::npos) std::fprintf(stderr, "  message: %s\n", message.c_str());
            EXPECT(message.find(words) != std::string::npos);
        };
        const uint8_t pixel[4] = {1, 2, 3, 4};
        eclipse_subject subject{};
        subject.keyword = "dog";
        eclipse_params p = base;
        p.subjects = &subject;
        p.subject_count = 1;
        const std::string missing = (d / "missing.png").string(), empty = (d / "empty.png").string(),
                          text = (d / "text.png").string();
        subject.image.path = missing.c_str();
        refused(p, "subject image 1 (dog) " + missing + ": no such file");
        subject.image.path = empty.c_str();
        refused(p, "the file is empty");
        subject.image.path = text.c_str();
        refused(p, "not a readable image");
        subject.image = eclipse_image{nullptr, pixel, 0, 1, 3, 0};
        refused(p, "subject image 1 (dog): the image is empty (0x1)");
        subject.image = eclipse_image{nullptr, pixel, 1, 1, 5, 0};
        refused(p, "channels 5 is not 1 (grey), 3 (RGB8) or 4 (RGBA8)");
        subject.image = eclipse_image{nullptr, nullptr, 1, 1, 3, 0};
        refused(p, "neither a path nor pixels");
        subject.image = eclipse_image{nullptr, pixel, 2, 1, 3, 4};
        refused(p, "stride 4 is less than a row (6 bytes)");
        subject.image = eclipse_image{nullptr, pixel, 1, 1, 3, 0};
        subject.keyword = " \t";
        refused(p, "subject 1: the keyword ' \\t' tokenizes to nothing");
        subject.keyword = nullptr;
        refused(p, "subject 1: the keyword must be a string");
        p.subjects = nullptr;
        refused(p, "subject_count is 1 but subjects is NULL");
        p = base;
        eclipse_image control{missing.c_str(), nullptr, 0, 0, 0, 0};
        p.control_image = &control;
        refused(p, "control image " + missing + ": no such file");
        p = base;
        const float values[2] = {0, 0};
        eclipse_noise noises[2] = {{"latents", values, 2}, {"sr_latents", values, 2}};
        p.noises = noises;
        p.noise_count = 2;
        noises[1].name = "nope";
        refused(p, "noises[1].name 'nope' is not a noise");
        noises[1].name = nullptr;
        refused(p, "noises[1].name is NULL");
        noises[1] = {"latents", values, 2};
        refused(p, "noise 'latents' is given twice in eclipse_params.noises");
        noises[1] = {"steps", nullptr, 2};
        refused(p, "noises[1] ('steps') has no data");
        p.noise_count = 1;
        p.latent_noise = values;
        p.latent_noise_count = 2;
        refused(p, "noise 'latents' is given twice (in eclipse_params.noises and its own field)");
        p = base;
        p.noise_count = 3;
        refused(p, "noise_count is 3 but noises is NULL");
        fs::remove_all(d);
    });

    return finish();
}
