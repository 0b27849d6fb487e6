// Subject / control image decoding and CLIP preprocessing, equal to the Python runtime
// (runtime/subjects.py). Where the Python side goes through Pillow, this file follows Pillow's
// integer arithmetic (alpha compositing, the fixed-point two-pass bicubic resample), because a
// float re-implementation would differ by one grey level here and there, and the image encoder
// would see different pixels than on the Python side.
#include "core/image_input.hpp"

#include <png.h>

#include <algorithm>
#include <cmath>
#include <csetjmp>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <nlohmann/json.hpp>

#include "core/common.hpp"

namespace eclipse::core {
namespace {

[[noreturn]] void bad(const std::string &message) { throw Error(ECLIPSE_ERR_INVALID_ARGUMENT, message); }

// --- alpha compositing on white: Pillow's Image.alpha_composite(white, rgba) ------------------
// (AlphaComposite.c: 7 extra bits of precision, divisions by 255 rounded with a shift trick)
inline uint8_t composite_on_white(uint32_t c, uint32_t a) {
    if (a == 0) return 255;
    constexpr uint32_t kBits = 7;
    const uint32_t blend = 255u * (255u - a);
    const uint32_t outa255 = a * 255u + blend;
    const uint32_t coef1 = a * 255u * 255u * (1u << kBits) / outa255;
    const uint32_t coef2 = 255u * (1u << kBits) - coef1;
    const uint32_t tmp = c * coef1 + 255u * coef2 + (0x80u << kBits);
    return static_cast<uint8_t>((((tmp >> 8) + tmp) >> 8) >> kBits);
}

// --- EXIF orientation (ImageOps.exif_transpose) -----------------------------------------------

// The Orientation tag (0x0112) of IFD0 of a TIFF-structured EXIF block; 1 when absent/malformed
// (the Python runtime keeps the stored orientation on a malformed block too).
int exif_orientation(const uint8_t *exif, size_t size) {
    if (size < 8) return 1;
    const bool little = exif[0] == 'I' && exif[1] == 'I';
    if (!little && !(exif[0] == 'M' && exif[1] == 'M')) return 1;
    auto u16 = [&](size_t at) -> uint32_t {
        return little ? exif[at] | (exif[at + 1] << 8) : (exif[at] << 8) | exif[at + 1];
    };
    auto u32 = [&](size_t at) -> uint32_t {
        return little ? u16(at) | (u16(at + 2) << 16) : (u16(at) << 16) | u16(at + 2);
    };
    const size_t ifd = u32(4);
    if (ifd + 2 > size) return 1;
    const size_t count = u16(ifd);
    for (size_t i = 0; i < count; ++i) {
        const size_t entry = ifd + 2 + 12 * i;
        if (entry + 12 > size) return 1;
        if (u16(entry) == 0x0112 && u16(entry + 2) == 3 /* SHORT */) {
            const uint32_t value = u16(entry + 8);
            return value >= 1 && value <= 8 ? static_cast<int>(value) : 1;
        }
    }
    return 1;
}

// Pillow's transpose for each orientation: 2 flip left-right, 3 rotate 180, 4 flip top-bottom,
// 5 transpose, 6 rotate 270 (counter-clockwise), 7 transverse, 8 rotate 90.
Rgb8Image apply_orientation(const Rgb8Image &in, int orientation) {
    if (orientation <= 1) return in;
    const bool swap = orientation >= 5;
    Rgb8Image out;
    out.width = swap ? in.height : in.width;
    out.height = swap ? in.width : in.height;
    out.pixels.resize(in.pixels.size());
    const int W = in.width, H = in.height;
    for (int y = 0; y < out.height; ++y) {
        for (int x = 0; x < out.width; ++x) {
            int sx = x, sy = y;  // the source pixel of output (x, y)
            switch (orientation) {
                case 2: sx = W - 1 - x; break;
                case 3: sx = W - 1 - x; sy = H - 1 - y; break;
                case 4: sy = H - 1 - y; break;
                case 5: sx = y; sy = x; break;
                case 6: sx = y; sy = H - 1 - x; break;
                case 7: sx = W - 1 - y; sy = H - 1 - x; break;
                case 8: sx = W - 1 - y; sy = x; break;
            }
            std::memcpy(&out.pixels[(static_cast<size_t>(y) * out.width + x) * 3],
                        &in.pixels[(static_cast<size_t>(sy) * W + sx) * 3], 3);
        }
    }
    return out;
}

// --- libpng ------------------------------------------------------------------------------------

struct PngRead {
    png_structp png = nullptr;
    png_infop info = nullptr;
    FILE *file = nullptr;
    char message[256] = {0};
    // what the read found; members (not locals) because a longjmp may clobber locals
    png_uint_32 width = 0, height = 0, exif_size = 0;
    int bit_depth = 0, color_type = 0, channels = 0;
    bool grey16 = false, too_large = false;
    uint8_t *exif = nullptr;
    std::vector<uint8_t> raw;
    std::vector<png_bytep> rows;
    ~PngRead() {
        if (png) png_destroy_read_struct(&png, info ? &info : nullptr, nullptr);
        if (file) std::fclose(file);
    }
};

void png_error_fn(png_structp png, png_const_charp message) {
    auto *state = static_cast<PngRead *>(png_get_error_ptr(png));
    std::snprintf(state->message, sizeof state->message, "%s", message);
    longjmp(png_jmpbuf(png), 1);
}
void png_warning_fn(png_structp, png_const_charp) {}  // Pillow reads past what libpng warns about

// 16-bit grey as the Python runtime scales Pillow's "I;16": x / 65535 * 255 rounded half to even
// when any value exceeds 255, else the values themselves.
void grey16_to_rgb(const std::vector<uint16_t> &grey, Rgb8Image &out) {
    const uint16_t top = grey.empty() ? 0 : *std::max_element(grey.begin(), grey.end());
    const double scale = top > 255 ? 65535.0 : 255.0;
    for (size_t i = 0; i < grey.size(); ++i) {
        const double v = std::nearbyint(std::clamp(static_cast<double>(grey[i]) / scale * 255.0, 0.0, 255.0));
        out.pixels[i * 3] = out.pixels[i * 3 + 1] = out.pixels[i * 3 + 2] = static_cast<uint8_t>(v);
    }
}

// 1 grey, 2 grey + alpha, 3 RGB, 4 RGBA -> RGB8 (alpha composited on white); sizes checked
Rgb8Image to_rgb8(const uint8_t *data, int width, int height, size_t stride_bytes, int channels) {
    Rgb8Image out;
    out.width = width;
    out.height = height;
    out.pixels.resize(static_cast<size_t>(width) * height * 3);
    for (int y = 0; y < height; ++y) {
        const uint8_t *row = data + stride_bytes * y;
        uint8_t *dst = &out.pixels[static_cast<size_t>(y) * width * 3];
        for (int x = 0; x < width; ++x, dst += 3) {
            const uint8_t *p = row + static_cast<size_t>(x) * channels;
            switch (channels) {
                case 1: dst[0] = dst[1] = dst[2] = p[0]; break;
                case 2: dst[0] = dst[1] = dst[2] = composite_on_white(p[0], p[1]); break;
                case 3: std::memcpy(dst, p, 3); break;
                default:
                    for (int k = 0; k < 3; ++k) dst[k] = composite_on_white(p[k], p[3]);
                    break;
            }
        }
    }
    return out;
}

}  // namespace

Rgb8Image decode_png_file(const std::string &path, const std::string &what) {
    namespace fs = std::filesystem;
    const std::string where = what + " " + path;
    std::error_code ec;
    if (!fs::exists(path, ec)) bad(where + ": no such file");
    if (!fs::is_regular_file(path, ec)) bad(where + ": not a file");
    if (fs::file_size(path, ec) == 0 || ec) bad(where + ": the file is empty");

    PngRead r;
    r.file = std::fopen(path.c_str(), "rb");
    if (!r.file) bad(where + ": cannot open it (" + std::strerror(errno) + ")");
    unsigned char signature[8] = {0};
    if (std::fread(signature, 1, 8, r.file) != 8 || png_sig_cmp(signature, 0, 8) != 0)
        bad(where + ": not a readable image (the C runtime reads PNG files; decode other formats yourself and "
                    "pass the RGB8 pixels)");
    r.png = png_create_read_struct(PNG_LIBPNG_VER_STRING, &r, png_error_fn, png_warning_fn);
    if (!r.png) throw Error(ECLIPSE_ERR_OUT_OF_MEMORY, where + ": out of memory");
    r.info = png_create_info_struct(r.png);
    if (!r.info) throw Error(ECLIPSE_ERR_OUT_OF_MEMORY, where + ": out of memory");

    // Everything the read sets lives in `r` (whose address libpng holds), so a longjmp clobbers
    // nothing and leaves nothing to unwind.
    if (setjmp(png_jmpbuf(r.png)) != 0)
        bad(where + ": not a readable image (libpng: " + (r.message[0] ? r.message : "error") + ")");
    png_init_io(r.png, r.file);
    png_set_sig_bytes(r.png, 8);
    png_set_user_limits(r.png, 0x7fffffff, 0x7fffffff);
    png_read_info(r.png, r.info);
    r.width = png_get_image_width(r.png, r.info);
    r.height = png_get_image_height(r.png, r.info);
    r.bit_depth = png_get_bit_depth(r.png, r.info);
    r.color_type = png_get_color_type(r.png, r.info);
    r.too_large = static_cast<uint64_t>(r.width) * r.height > static_cast<uint64_t>(kMaxImagePixels);
    if (!r.too_large && r.width > 0 && r.height > 0) {
        // Pillow's modes: palette -> RGB (RGBA when it has tRNS), grey 1/2/4-bit -> 0..255,
        // 16-bit colour -> its high byte; tRNS of grey/RGB images is ignored (Pillow keeps it
        // as info only); 16-bit grey stays 16-bit for the scaling below.
        r.grey16 = r.color_type == PNG_COLOR_TYPE_GRAY && r.bit_depth == 16;
        if (r.color_type == PNG_COLOR_TYPE_PALETTE) {
            png_set_palette_to_rgb(r.png);
            if (png_get_valid(r.png, r.info, PNG_INFO_tRNS)) png_set_tRNS_to_alpha(r.png);
        }
        if (r.color_type == PNG_COLOR_TYPE_GRAY && r.bit_depth < 8) png_set_expand_gray_1_2_4_to_8(r.png);
        if (r.bit_depth == 16 && !r.grey16) png_set_strip_16(r.png);
        if (r.grey16) png_set_swap(r.png);  // little-endian uint16 in memory (x86, aarch64)
        png_set_interlace_handling(r.png);
        png_read_update_info(r.png, r.info);
        r.channels = png_get_channels(r.png, r.info);
        const size_t row_bytes = png_get_rowbytes(r.png, r.info);
        r.raw.resize(row_bytes * r.height);
        r.rows.resize(r.height);
        for (png_uint_32 y = 0; y < r.height; ++y) r.rows[y] = r.raw.data() + row_bytes * y;
        png_read_image(r.png, r.rows.data());
        png_read_end(r.png, r.info);  // an eXIf chunk may follow the image data
#ifdef PNG_eXIf_SUPPORTED
        png_get_eXIf_1(r.png, r.info, &r.exif_size, &r.exif);
#endif
    }
    if (r.too_large)
        bad(where + ": " + std::to_string(r.width) + "x" + std::to_string(r.height) +
            " is larger than this runtime reads (" + std::to_string(kMaxImagePixels) + " pixels)");
    if (r.width == 0 || r.height == 0) bad(where + ": the image is empty");

    Rgb8Image out;
    if (r.grey16) {
        const size_t n = static_cast<size_t>(r.width) * r.height;
        out.width = static_cast<int>(r.width);
        out.height = static_cast<int>(r.height);
        out.pixels.resize(n * 3);
        std::vector<uint16_t> grey(n);
        std::memcpy(grey.data(), r.raw.data(), n * 2);
        grey16_to_rgb(grey, out);
    } else {
        out = to_rgb8(r.raw.data(), static_cast<int>(r.width), static_cast<int>(r.height),
                      png_get_rowbytes(r.png, r.info), r.channels);
    }
    const int orientation = r.exif ? exif_orientation(r.exif, r.exif_size) : 1;
    return apply_orientation(out, orientation);
}

Rgb8Image rgb8_from_buffer(const uint8_t *data, int width, int height, size_t stride_bytes, int channels,
                           const std::string &what) {
    if (!data) bad(what + ": no pixels (NULL)");
    if (width <= 0 || height <= 0)
        bad(what + ": the image is empty (" + std::to_string(width) + "x" + std::to_string(height) + ")");
    if (channels != 1 && channels != 3 && channels != 4)
        bad(what + ": channels must be 1 (grey), 3 (RGB) or 4 (RGBA), got " + std::to_string(channels));
    if (static_cast<int64_t>(width) * height > kMaxImagePixels)
        bad(what + ": " + std::to_string(width) + "x" + std::to_string(height) + " is larger than this runtime reads (" +
            std::to_string(kMaxImagePixels) + " pixels)");
    const size_t packed = static_cast<size_t>(width) * channels;
    if (stride_bytes == 0) stride_bytes = packed;
    if (stride_bytes < packed)
        bad(what + ": a row stride of " + std::to_string(stride_bytes) + " bytes is shorter than a row (" +
            std::to_string(packed) + ")");
    return to_rgb8(data, width, height, stride_bytes, channels);
}

// --- Pillow's resample (Resample.c, 8 bits per channel) -----------------------------------------
namespace {

constexpr int kPrecisionBits = 32 - 8 - 2;

double bicubic(double x) {  // Keys' cubic, a = -0.5, support 2
    constexpr double a = -0.5;
    if (x < 0.0) x = -x;
    if (x < 1.0) return ((a + 2.0) * x - (a + 3.0)) * x * x + 1.0;
    if (x < 2.0) return (((x - 5) * x + 8) * x - 4) * a;
    return 0.0;
}

struct Coefficients {
    int ksize = 0;
    std::vector<int> bounds;  // (first input index, tap count) per output index
    std::vector<int32_t> kk;  // ksize fixed-point weights per output index
};

// precompute_coeffs + normalize_coeffs_8bpc for the whole input range (box 0..in_size)
Coefficients coefficients(int in_size, int out_size) {
    const double scale = static_cast<double>(in_size) / out_size;
    const double filterscale = std::max(scale, 1.0);
    const double support = 2.0 * filterscale;
    Coefficients c;
    c.ksize = static_cast<int>(std::ceil(support)) * 2 + 1;
    c.bounds.resize(static_cast<size_t>(out_size) * 2);
    c.kk.assign(static_cast<size_t>(out_size) * c.ksize, 0);
    std::vector<double> k(c.ksize);
    for (int xx = 0; xx < out_size; ++xx) {
        const double center = (xx + 0.5) * scale;
        const double ss = 1.0 / filterscale;
        int xmin = static_cast<int>(center - support + 0.5);  // C's truncation, as Pillow
        if (xmin < 0) xmin = 0;
        int xmax = static_cast<int>(center + support + 0.5);
        if (xmax > in_size) xmax = in_size;
        xmax -= xmin;
        double ww = 0.0;
        for (int x = 0; x < xmax; ++x) ww += (k[x] = bicubic((x + xmin - center + 0.5) * ss));
        for (int x = 0; x < xmax; ++x) {
            const double w = ww != 0.0 ? k[x] / ww : k[x];
            // round half away from zero into 22 fractional bits
            c.kk[static_cast<size_t>(xx) * c.ksize + x] =
                static_cast<int32_t>(w < 0 ? -0.5 + w * (1 << kPrecisionBits) : 0.5 + w * (1 << kPrecisionBits));
        }
        c.bounds[xx * 2] = xmin;
        c.bounds[xx * 2 + 1] = xmax;
    }
    return c;
}

inline uint8_t clip8(int32_t v) {
    const int32_t x = v >> kPrecisionBits;  // arithmetic shift: floor, as Pillow's lookup index
    return static_cast<uint8_t>(x < 0 ? 0 : (x > 255 ? 255 : x));
}

}  // namespace

namespace {

// One pass along x over rows [first, first + out.height) of `in` (Pillow's ResampleHorizontal)
Rgb8Image pass_horizontal(const Rgb8Image &in, int out_width, int rows, int first, const Coefficients &c) {
    Rgb8Image out;
    out.width = out_width;
    out.height = rows;
    out.pixels.resize(static_cast<size_t>(out_width) * rows * 3);
    for (int yy = 0; yy < rows; ++yy) {
        const uint8_t *src = &in.pixels[static_cast<size_t>(yy + first) * in.width * 3];
        for (int xx = 0; xx < out_width; ++xx) {
            const int xmin = c.bounds[xx * 2], xmax = c.bounds[xx * 2 + 1];
            const int32_t *k = &c.kk[static_cast<size_t>(xx) * c.ksize];
            for (int ch = 0; ch < 3; ++ch) {
                int32_t ss = 1 << (kPrecisionBits - 1);
                for (int x = 0; x < xmax; ++x) ss += src[(x + xmin) * 3 + ch] * k[x];
                out.pixels[(static_cast<size_t>(yy) * out_width + xx) * 3 + ch] = clip8(ss);
            }
        }
    }
    return out;
}

// One pass along y (Pillow's ResampleVertical); bounds relative to `in`'s first row
Rgb8Image pass_vertical(const Rgb8Image &in, int out_height, const Coefficients &c) {
    Rgb8Image out;
    out.width = in.width;
    out.height = out_height;
    out.pixels.resize(static_cast<size_t>(in.width) * out_height * 3);
    for (int yy = 0; yy < out_height; ++yy) {
        const int ymin = c.bounds[yy * 2], ymax = c.bounds[yy * 2 + 1];
        const int32_t *k = &c.kk[static_cast<size_t>(yy) * c.ksize];
        for (int xx = 0; xx < in.width; ++xx) {
            for (int ch = 0; ch < 3; ++ch) {
                int32_t ss = 1 << (kPrecisionBits - 1);
                for (int y = 0; y < ymax; ++y)
                    ss += in.pixels[(static_cast<size_t>(y + ymin) * in.width + xx) * 3 + ch] * k[y];
                out.pixels[(static_cast<size_t>(yy) * in.width + xx) * 3 + ch] = clip8(ss);
            }
        }
    }
    return out;
}

}  // namespace

Rgb8Image resize_bicubic_pillow(const Rgb8Image &in, int out_width, int out_height) {
    const bool need_horizontal = out_width != in.width, need_vertical = out_height != in.height;
    if (!need_horizontal && !need_vertical) return in;
    const Coefficients horiz = coefficients(in.width, out_width);
    Coefficients vert = coefficients(in.height, out_height);
    // Pillow 13 (ImagingResampleInner): when the height shrinks by more than twice as many
    // pixels as the width, the vertical pass runs first. The passes round to 8 bits in between,
    // so the order shows in the pixels (older Pillow always went horizontal first).
    const int dy = in.height - out_height, dx = in.width - out_width;
    const bool horizontal_first = !(dy > 0 && dy > dx * 2);
    if (!horizontal_first) {
        const Rgb8Image tall = need_vertical ? pass_vertical(in, out_height, vert) : in;
        return need_horizontal ? pass_horizontal(tall, out_width, out_height, 0, horiz) : tall;
    }
    if (!need_horizontal) return pass_vertical(in, out_height, vert);
    // only the rows the vertical pass reads (Pillow's ybox_first .. ybox_last)
    const int first = vert.bounds[0];
    const int last = vert.bounds[out_height * 2 - 2] + vert.bounds[out_height * 2 - 1];
    for (int i = 0; i < out_height; ++i) vert.bounds[i * 2] -= first;
    const Rgb8Image wide = pass_horizontal(in, out_width, last - first, first, horiz);
    return need_vertical ? pass_vertical(wide, out_height, vert) : wide;
}

ClipImageConfig ClipImageConfig::from_json(const nlohmann::json &config) {
    const std::string prefix = "preprocessor_config.json is not a CLIPImageProcessor config this runtime follows (";
    ClipImageConfig out;
    try {
        if (!config.is_object()) throw std::invalid_argument("not a JSON object");
        auto truthy = [&](const char *key) {
            if (!config.contains(key)) return true;
            const auto &v = config.at(key);
            return !(v.is_null() || (v.is_boolean() && !v.get<bool>()) || (v.is_number() && v.get<double>() == 0));
        };
        for (const char *key : {"do_resize", "do_center_crop", "do_rescale", "do_normalize"})
            if (!truthy(key)) throw std::invalid_argument("do_resize/do_center_crop/do_rescale/do_normalize must all be true");
        if (config.contains("size")) {
            const auto &size = config.at("size");
            out.shortest_edge = size.is_object() ? size.at("shortest_edge").get<int>() : size.get<int>();
        }
        if (config.contains("crop_size")) {
            const auto &crop = config.at("crop_size");
            out.crop_height = crop.is_object() ? crop.at("height").get<int>() : crop.get<int>();
            out.crop_width = crop.is_object() ? crop.at("width").get<int>() : crop.get<int>();
        }
        if (config.contains("resample") && config.at("resample").get<int>() != 3)
            throw std::invalid_argument("resample " + config.at("resample").dump() +
                                        ": the C runtime implements bicubic (3) only");
        if (config.contains("rescale_factor")) out.rescale_factor = config.at("rescale_factor").get<double>();
        const auto &mean = config.at("image_mean");
        const auto &std_ = config.at("image_std");
        if (!mean.is_array() || !std_.is_array() || mean.size() != 3 || std_.size() != 3)
            throw std::invalid_argument("image_mean/image_std need 3 values");
        for (int i = 0; i < 3; ++i) {
            out.mean[i] = static_cast<float>(mean[i].get<double>());
            out.std[i] = static_cast<float>(std_[i].get<double>());
        }
    } catch (const std::exception &e) {
        throw Error(ECLIPSE_ERR_BUNDLE, prefix + e.what() + ")");
    }
    if (*std::min_element(out.std, out.std + 3) <= 0 || out.shortest_edge < 1 || out.crop_height < 1 || out.crop_width < 1)
        throw Error(ECLIPSE_ERR_BUNDLE, prefix + "image_std must be > 0, sizes >= 1)");
    return out;
}

std::vector<float> clip_preprocess(const Rgb8Image &image, const ClipImageConfig &config) {
    // transformers' get_resize_output_image_size(size=int, default_to_square=False)
    const int h = image.height, w = image.width;
    const int64_t shorter = std::min(h, w), longer = std::max(h, w);
    const int new_long = static_cast<int>(static_cast<double>(config.shortest_edge * longer) / static_cast<double>(shorter));
    const int new_h = h <= w ? config.shortest_edge : new_long;
    const int new_w = h <= w ? new_long : config.shortest_edge;
    Rgb8Image resized = (new_w == w && new_h == h) ? image : resize_bicubic_pillow(image, new_w, new_h);

    const int ch = config.crop_height, cw = config.crop_width;
    // transformers pads with zeros (centred) when the crop is larger than the resized image
    const int ph = std::max(new_h, ch), pw = std::max(new_w, cw);
    const int pt = (ph - new_h) / 2, pl = (pw - new_w) / 2;
    const int top = (ph - ch) / 2, left = (pw - cw) / 2;

    std::vector<float> out(static_cast<size_t>(3) * ch * cw);
    for (int y = 0; y < ch; ++y) {
        for (int x = 0; x < cw; ++x) {
            const int sy = top + y - pt, sx = left + x - pl;
            const bool inside = sy >= 0 && sy < new_h && sx >= 0 && sx < new_w;
            for (int c = 0; c < 3; ++c) {
                const uint8_t v = inside ? resized.pixels[(static_cast<size_t>(sy) * new_w + sx) * 3 + c] : 0;
                const float scaled = static_cast<float>(static_cast<double>(v) * config.rescale_factor);
                out[(static_cast<size_t>(c) * ch + y) * cw + x] = (scaled - config.mean[c]) / config.std[c];
            }
        }
    }
    return out;
}

}  // namespace eclipse::core
