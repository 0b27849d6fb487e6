// eclipse-image-check: the C library's subject-image decoding and CLIP preprocessing on the
// command line, so that tests/test_cpp_image_input.py can hold them equal to the Python runtime
// (which Pillow and transformers' CLIPImageProcessor check) on many images.
//   eclipse-image-check decode <image.png> <out.rgb>              -> prints "W H"
//   eclipse-image-check buffer <in.raw> W H C STRIDE <out.rgb>     -> prints "W H"
//   eclipse-image-check resize <image.png> W H <out.rgb>            (Pillow's bicubic resize)
//   eclipse-image-check preprocess <preprocessor_config.json> <image.png> <out.f32>
// A refused image prints "error: <message>" and exits 2, as the C API would report it.
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <iostream>
#include <iterator>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "core/common.hpp"
#include "core/image_input.hpp"

using namespace eclipse::core;

namespace {

void write(const std::string &path, const void *data, size_t bytes) {
    std::ofstream out(path, std::ios::binary);
    out.write(static_cast<const char *>(data), static_cast<std::streamsize>(bytes));
    if (!out) throw std::runtime_error("cannot write " + path);
}

int run(int argc, char **argv) {
    const std::string mode = argc > 1 ? argv[1] : "";
    if (mode == "decode" && argc == 4) {
        const Rgb8Image image = decode_png_file(argv[2], "subject image");
        write(argv[3], image.pixels.data(), image.pixels.size());
        std::cout << image.width << " " << image.height << "\n";
        return 0;
    }
    if (mode == "buffer" && argc == 8) {
        std::ifstream in(argv[2], std::ios::binary);
        const std::vector<char> raw((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
        const Rgb8Image image = rgb8_from_buffer(raw.empty() ? nullptr : reinterpret_cast<const uint8_t *>(raw.data()),
                                                 std::atoi(argv[3]), std::atoi(argv[4]), std::strtoull(argv[6], nullptr, 10),
                                                 std::atoi(argv[5]), "subject image");
        write(argv[7], image.pixels.data(), image.pixels.size());
        std::cout << image.width << " " << image.height << "\n";
        return 0;
    }
    if (mode == "resize" && argc == 6) {
        const Rgb8Image image = resize_bicubic_pillow(decode_png_file(argv[2], "subject image"), std::atoi(argv[3]),
                                                      std::atoi(argv[4]));
        write(argv[5], image.pixels.data(), image.pixels.size());
        std::cout << image.width << " " << image.height << "\n";
        return 0;
    }
    if (mode == "preprocess" && argc == 5) {
        std::ifstream in(argv[2]);
        const ClipImageConfig config = ClipImageConfig::from_json(nlohmann::json::parse(in));
        const std::vector<float> values = clip_preprocess(decode_png_file(argv[3], "subject image"), config);
        write(argv[4], values.data(), values.size() * sizeof(float));
        std::cout << config.crop_width << " " << config.crop_height << "\n";
        return 0;
    }
    std::cerr << "usage: eclipse-image-check decode IMAGE OUT | buffer RAW W H C STRIDE OUT | resize IMAGE W H OUT | "
                 "preprocess CONFIG IMAGE OUT\n";
    return 2;
}

}  // namespace

int main(int argc, char **argv) {
    try {
        return run(argc, argv);
    } catch (const Error &e) {
        std::cerr << "error: " << e.what() << "\n";
        return 2;
    } catch (const std::exception &e) {
        std::cerr << "error: " << e.what() << "\n";
        return 1;
    }
}
