// PNG output with libpng, written atomically (a temporary file in the same directory, renamed
// into place), with no timestamps or other metadata: the same pixels give the same bytes.
#include <sys/stat.h>
#include <png.h>
#include <unistd.h>

#include <csetjmp>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <vector>

#include "core/pipeline.hpp"

namespace eclipse::core {

void save_png(const std::string &path, const uint8_t *pixels, int32_t width, int32_t height) {
    namespace fs = std::filesystem;
    const fs::path target(path);
    const fs::path dir = target.has_parent_path() ? target.parent_path() : fs::path(".");
    std::error_code ec;
    if (fs::is_directory(target, ec)) throw Error(ECLIPSE_ERR_IO, "cannot write " + path + ": it is a directory");
    if (!fs::is_directory(dir, ec)) throw Error(ECLIPSE_ERR_IO, "cannot write " + path + ": directory " + dir.string() + " does not exist");
    std::string tmp = (dir / ("." + target.filename().string() + ".XXXXXX")).string();
    std::vector<char> name(tmp.begin(), tmp.end());
    name.push_back('\0');
    const int fd = mkstemp(name.data());
    if (fd < 0) throw Error(ECLIPSE_ERR_IO, "cannot write " + path + ": " + std::strerror(errno));
    tmp = name.data();
    // mkstemp creates the file 0600: give the image the ordinary mode (0666 less the umask), as
    // any file the caller writes would have
    const mode_t mask = umask(0);
    umask(mask);
    fchmod(fd, 0666 & ~mask);
    FILE *f = fdopen(fd, "wb");
    png_structp png = png_create_write_struct(PNG_LIBPNG_VER_STRING, nullptr, nullptr, nullptr);
    png_infop info = png ? png_create_info_struct(png) : nullptr;
    volatile bool ok = f && png && info;  // volatile: read after a longjmp from libpng
    if (ok && setjmp(png_jmpbuf(png)) == 0) {
        png_init_io(png, f);
        png_set_IHDR(png, info, static_cast<png_uint_32>(width), static_cast<png_uint_32>(height), 8, PNG_COLOR_TYPE_RGB,
                     PNG_INTERLACE_NONE, PNG_COMPRESSION_TYPE_DEFAULT, PNG_FILTER_TYPE_DEFAULT);
        png_write_info(png, info);
        for (int32_t y = 0; y < height; ++y)
            png_write_row(png, const_cast<png_bytep>(pixels + static_cast<size_t>(y) * static_cast<size_t>(width) * 3));
        png_write_end(png, nullptr);
    } else {
        ok = false;
    }
    if (png) png_destroy_write_struct(&png, info ? &info : nullptr);
    if (f) ok = (std::fflush(f) == 0) && ok, ok = (std::fclose(f) == 0) && ok;
    else close(fd);
    if (ok && std::rename(tmp.c_str(), path.c_str()) == 0) return;
    const std::string why = std::strerror(errno);
    std::remove(tmp.c_str());
    throw Error(ECLIPSE_ERR_IO, "cannot write " + path + ": " + why);
}

}  // namespace eclipse::core
