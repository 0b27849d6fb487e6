// λ-ECLIPSE's subject and control images on the C/C++ side: decoding (PNG with libpng, or a
// caller's RGB8/RGBA8/grey buffer) and CLIPImageProcessor's preprocessing, both equal to the
// Python runtime (eclipse_export/runtime/subjects.py: load_image, preprocess), which is itself
// tested against transformers' CLIPImageProcessor. tests/test_cpp_image_input.py holds the two
// equal byte for byte (decoded pixels) and value for value (pixel values).
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

#include <nlohmann/json_fwd.hpp>

namespace eclipse::core {

struct Rgb8Image {
    int width = 0, height = 0;
    std::vector<uint8_t> pixels;  // height * width * 3, packed rows
};

// Largest image decoded (the Python runtime's MAX_PIXELS): a subject never needs more, and a
// forged header must not make the library allocate gigabytes.
constexpr int64_t kMaxImagePixels = 64LL * 1024 * 1024;

// A PNG file -> RGB8, as runtime/subjects.py load_image decodes it with Pillow: EXIF orientation
// (an eXIf chunk) applied; RGBA, grey+alpha and palette-with-transparency composited on white
// with Pillow's integer arithmetic; grey and palette expanded; 16-bit colour reduced to its high
// byte (Pillow's raw modes do the same); 16-bit grey scaled to 8 bits as the Python runtime does.
// Errors: Error(ECLIPSE_ERR_INVALID_ARGUMENT, "<what> <path>: ...") in one line.
Rgb8Image decode_png_file(const std::string &path, const std::string &what);

// A caller's buffer (channels 1 = grey, 3 = RGB, 4 = RGBA composited on white) -> RGB8.
// stride_bytes 0 means packed rows (width * channels).
Rgb8Image rgb8_from_buffer(const uint8_t *data, int width, int height, size_t stride_bytes, int channels,
                           const std::string &what);

// The bundle's preprocessor_config.json of a CLIPImageProcessor (the steps CLIP uses; a config
// that switches one off, or asks for a resample other than bicubic, is refused).
struct ClipImageConfig {
    int shortest_edge = 224;
    int crop_height = 224, crop_width = 224;
    double rescale_factor = 1.0 / 255.0;
    float mean[3] = {0, 0, 0}, std[3] = {1, 1, 1};

    static ClipImageConfig from_json(const nlohmann::json &preprocessor_config);
};

// RGB8 -> (3, crop_height, crop_width) float32 CHW pixel values: shortest edge to
// `shortest_edge` with Pillow's bicubic (its fixed-point two-pass resample), centre crop
// (zero-padded when the crop is larger), x rescale_factor in double then float, (x - mean) / std.
std::vector<float> clip_preprocess(const Rgb8Image &image, const ClipImageConfig &config);

// Pillow's Image.resize(size, BICUBIC) of an RGB8 image (exposed for the tests).
Rgb8Image resize_bicubic_pillow(const Rgb8Image &image, int out_width, int out_height);

}  // namespace eclipse::core
