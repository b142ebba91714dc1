#pragma once
// A tiny raster canvas for the demo's figures: lines, rectangles, text (stb_easy_font's quads)
// and PNG output (stb_image_write). Define TOY_PLOT_IMPLEMENTATION in exactly one file.

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdio>
#include <string>
#include <vector>

#include <stb/stb_easy_font.h>

namespace toy::plot {

using rgb = std::array<unsigned char, 3>;
inline constexpr rgb black{0, 0, 0}, grey{200, 200, 200}, white{255, 255, 255};
inline constexpr rgb dpo_colour{31, 119, 180}, tpo_colour{214, 39, 40}, sft_colour{44, 160, 44};

bool write_png(const std::string& path, int w, int h, const unsigned char* data);

class canvas {
public:
    canvas(int w, int h) : w_(w), h_(h), px_(static_cast<std::size_t>(w) * h * 3, 255) {}
    int width() const { return w_; }
    int height() const { return h_; }

    void dot(int x, int y, rgb c) {
        if (x < 0 || y < 0 || x >= w_ || y >= h_) return;
        std::copy(c.begin(), c.end(), px_.begin() + (static_cast<std::size_t>(y) * w_ + x) * 3);
    }
    void rect(int x0, int y0, int x1, int y1, rgb c) {
        for (int y = y0; y < y1; ++y)
            for (int x = x0; x < x1; ++x) dot(x, y, c);
    }
    void line(double x0, double y0, double x1, double y1, rgb c, int thick = 1) {
        const int n = static_cast<int>(std::max(std::abs(x1 - x0), std::abs(y1 - y0))) + 1;
        for (int i = 0; i <= n; ++i) {
            const double t = static_cast<double>(i) / n;
            const int x = static_cast<int>(std::lround(x0 + t * (x1 - x0)));
            const int y = static_cast<int>(std::lround(y0 + t * (y1 - y0)));
            for (int dy = 0; dy < thick; ++dy)
                for (int dx = 0; dx < thick; ++dx) dot(x + dx - thick / 2, y + dy - thick / 2, c);
        }
    }
    /// Text at (x, y) top-left, scaled by an integer factor.
    void text(int x, int y, const std::string& s, rgb c, int scale = 1) {
        static std::vector<char> buffer(200000);
        std::string copy = s;
        const int quads = stb_easy_font_print(0, 0, copy.data(), nullptr, buffer.data(), static_cast<int>(buffer.size()));
        struct vertex {
            float x, y, z;
            unsigned char c[4];
        };
        const auto* v = reinterpret_cast<const vertex*>(buffer.data());
        for (int q = 0; q < quads; ++q) {
            const vertex* quad = v + 4 * q;
            const int qx0 = static_cast<int>(quad[0].x), qy0 = static_cast<int>(quad[0].y);
            const int qx1 = static_cast<int>(quad[2].x), qy1 = static_cast<int>(quad[2].y);
            rect(x + qx0 * scale, y + qy0 * scale, x + qx1 * scale, y + qy1 * scale, c);
        }
    }
    static int text_width(const std::string& s, int scale = 1) {
        std::string copy = s;
        return stb_easy_font_width(copy.data()) * scale;
    }
    bool save(const std::string& path) const { return write_png(path, w_, h_, px_.data()); }

private:
    int w_, h_;
    std::vector<unsigned char> px_;
};

struct series {
    std::string name;
    rgb colour;
    std::vector<double> x, y;
    std::vector<double> low, high;  // optional band (e.g. min/max over seeds)
    bool bars = false;               // draw low–high as an error bar at each point instead of a band
    bool markers = false;            // a dot at each point
};

inline std::string short_number(double v) {
    char buf[32];
    if (v == std::round(v) && std::abs(v) < 1e9) {
        std::snprintf(buf, sizeof buf, "%.0f", v);
        return buf;
    }
    std::snprintf(buf, sizeof buf, std::abs(v) >= 100 ? "%.0f" : std::abs(v) >= 10 ? "%.1f" : "%.2f", v);
    return buf;
}

/// A line chart with axes, min/max tick labels and a legend, inside the box (x, y, w, h).
inline void line_chart(canvas& cv, int x, int y, int w, int h, const std::string& title, const std::string& xlabel,
                       const std::vector<series>& all) {
    double xmin = 1e300, xmax = -1e300, ymin = 1e300, ymax = -1e300;
    for (const auto& s : all)
        for (std::size_t i = 0; i < s.x.size(); ++i) {
            xmin = std::min(xmin, s.x[i]);
            xmax = std::max(xmax, s.x[i]);
            ymin = std::min(ymin, s.low.empty() ? s.y[i] : s.low[i]);
            ymax = std::max(ymax, s.high.empty() ? s.y[i] : s.high[i]);
        }
    if (xmin > xmax) return;
    if (ymax - ymin < 1e-9) ymax = ymin + 1;
    const double pad = 0.05 * (ymax - ymin);
    ymin -= pad;
    ymax += pad;
    if (xmax == xmin) xmax = xmin + 1;
    const int left = x + 50, right = x + w - 10, top = y + 28, bottom = y + h - 30;
    auto px = [&](double v) { return left + (v - xmin) / (xmax - xmin) * (right - left); };
    auto py = [&](double v) { return bottom - (v - ymin) / (ymax - ymin) * (bottom - top); };
    cv.text(x + (w - canvas::text_width(title, 2)) / 2, y + 4, title, black, 2);
    for (int k = 0; k <= 4; ++k) {
        const double v = ymin + (ymax - ymin) * k / 4;
        cv.line(left, py(v), right, py(v), grey);
        cv.text(x + 2, static_cast<int>(py(v)) - 3, short_number(v), black);
    }
    cv.line(left, top, left, bottom, black);
    cv.line(left, bottom, right, bottom, black);
    for (int k = 0; k <= 4; ++k) {
        const std::string label = short_number(xmin + (xmax - xmin) * k / 4);
        const double at = px(xmin + (xmax - xmin) * k / 4);
        cv.line(at, bottom, at, bottom + 3, black);
        cv.text(static_cast<int>(at) - (k == 0 ? 0 : k == 4 ? canvas::text_width(label) : canvas::text_width(label) / 2), bottom + 5, label, black);
    }
    cv.text(x + (w - canvas::text_width(xlabel)) / 2, bottom + 16, xlabel, black);
    for (const auto& s : all) {
        if (!s.low.empty() && s.bars) {
            for (std::size_t i = 0; i < s.x.size(); ++i) {
                cv.line(px(s.x[i]), py(s.low[i]), px(s.x[i]), py(s.high[i]), s.colour);
                cv.line(px(s.x[i]) - 3, py(s.low[i]), px(s.x[i]) + 3, py(s.low[i]), s.colour);
                cv.line(px(s.x[i]) - 3, py(s.high[i]), px(s.x[i]) + 3, py(s.high[i]), s.colour);
            }
        } else if (!s.low.empty()) {
            rgb light{static_cast<unsigned char>(255 - (255 - s.colour[0]) / 4),
                      static_cast<unsigned char>(255 - (255 - s.colour[1]) / 4),
                      static_cast<unsigned char>(255 - (255 - s.colour[2]) / 4)};
            for (std::size_t i = 0; i + 1 < s.x.size(); ++i)
                for (double t = 0; t <= 1; t += 0.05) {
                    const double xv = s.x[i] + t * (s.x[i + 1] - s.x[i]);
                    const double lo = s.low[i] + t * (s.low[i + 1] - s.low[i]);
                    const double hi = s.high[i] + t * (s.high[i + 1] - s.high[i]);
                    cv.line(px(xv), py(lo), px(xv), py(hi), light);
                }
        }
    }
    int legend_y = top + 4;
    for (const auto& s : all) {
        for (std::size_t i = 0; i + 1 < s.x.size(); ++i) cv.line(px(s.x[i]), py(s.y[i]), px(s.x[i + 1]), py(s.y[i + 1]), s.colour, 2);
        if (s.markers)
            for (std::size_t i = 0; i < s.x.size(); ++i) {
                const int cx = static_cast<int>(std::lround(px(s.x[i]))), cy = static_cast<int>(std::lround(py(s.y[i])));
                cv.rect(cx - 3, cy - 3, cx + 4, cy + 4, s.colour);
            }
        const int legend_x = right - std::max(90, canvas::text_width(s.name) + 20);
        cv.rect(legend_x, legend_y + 2, legend_x + 10, legend_y + 8, s.colour);
        cv.text(legend_x + 14, legend_y, s.name, black);
        legend_y += 12;
    }
}

/// Weight in [lo, hi] → white-to-red (above the midpoint) or white-to-blue (below).
inline rgb diverging(double v, double lo, double hi) {
    const double mid = 0.5 * (lo + hi);
    const double t = std::clamp((v - mid) / (0.5 * (hi - lo)), -1.0, 1.0);
    auto mix = [](double from, double to, double f) { return static_cast<unsigned char>(from + (to - from) * f); };
    if (t >= 0) return {255, mix(255, 40, t), mix(255, 40, t)};
    return {mix(255, 40, -t), mix(255, 90, -t), 255};
}

}  // namespace toy::plot

#ifdef TOY_PLOT_IMPLEMENTATION
#  define STB_IMAGE_WRITE_IMPLEMENTATION
#  include <stb/stb_image_write.h>
bool toy::plot::write_png(const std::string& path, int w, int h, const unsigned char* data) {
    return stbi_write_png(path.c_str(), w, h, 3, data, w * 3) != 0;
}
#endif
