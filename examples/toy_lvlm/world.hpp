#pragma once
// The procedural visual world of the toy LVLM: 16×16 RGB scenes holding one to three coloured
// shapes, and their captions in a 17-word vocabulary ("there is a red square and a blue circle .").
//
// Shapes come in co-occurrence pairs (square–circle, triangle–cross, bar–ring). In the biased
// world, the one supervised fine-tuning sees, a shape's partner is present most of the time, so
// maximum likelihood learns "after square comes circle" — and says it when no circle is there.
// Held-out scenes (and the preference images) come from the uniform world, where shapes are drawn
// independently: that is where the learnt prior turns into hallucinated objects.

#include <algorithm>
#include <array>
#include <cstdint>
#include <random>
#include <string>
#include <vector>

namespace toy {

inline constexpr int image_size = 16;
inline constexpr int channels = 3;
inline constexpr int pixels = channels * image_size * image_size;
inline constexpr int num_shapes = 6;
inline constexpr int num_colours = 4;
inline constexpr int max_objects = 3;
inline constexpr int glyph = 5;

// Vocabulary: function words, then colours (attributes), then shapes (objects).
enum token : int { bos = 0, there, is, a, and_, stop, pad, first_colour, first_shape = first_colour + num_colours };
inline constexpr int vocab_size = first_shape + num_shapes;
// BOS + "there is" + 3 × "a colour shape" + 2 × "and" + "." = 15.
inline constexpr int max_length = 1 + 2 + 3 * max_objects + (max_objects - 1) + 1;

inline const std::array<const char*, vocab_size> words = {
    "<bos>", "there", "is", "a", "and", ".", "<pad>", "red", "green", "blue", "yellow",
    "square", "circle", "triangle", "cross", "bar", "ring"};

enum class token_class { function, attribute, object };
inline token_class classify(int t) {
    if (t >= first_shape) return token_class::object;
    if (t >= first_colour) return token_class::attribute;
    return token_class::function;
}
inline int shape_token(int shape) { return first_shape + shape; }
inline int colour_token(int colour) { return first_colour + colour; }
inline bool is_shape_token(int t) { return t >= first_shape && t < vocab_size; }
/// square↔circle, triangle↔cross, bar↔ring.
inline int partner(int shape) { return shape ^ 1; }

struct object {
    int shape = 0, colour = 0, x = 0, y = 0;
};

struct scene {
    std::vector<object> objects;  // sorted by shape: captions list objects in a canonical order
    bool has(int shape) const {
        return std::any_of(objects.begin(), objects.end(), [&](const object& o) { return o.shape == shape; });
    }
};

using caption = std::vector<int>;  // BOS first, "." last, no padding

inline caption describe(const std::vector<object>& objects) {
    caption c{bos, there, is};
    for (std::size_t i = 0; i < objects.size(); ++i) {
        if (i) c.push_back(and_);
        c.insert(c.end(), {a, colour_token(objects[i].colour), shape_token(objects[i].shape)});
    }
    c.push_back(stop);
    return c;
}
inline caption describe(const scene& s) { return describe(s.objects); }

/// BOS "there is" "a colour shape" ("and a colour shape"){0,2} "." — what every training caption is.
inline bool grammatical(const caption& c) {
    std::size_t i = 0;
    auto next = [&](auto pred) { return i < c.size() && pred(c[i]) ? (++i, true) : false; };
    auto eq = [](int want) { return [want](int t) { return t == want; }; };
    auto colour = [](int t) { return classify(t) == token_class::attribute; };
    if (!(next(eq(bos)) && next(eq(there)) && next(eq(is)))) return false;
    for (int k = 0; k < max_objects; ++k) {
        if (k > 0 && !next(eq(and_))) break;
        if (!(next(eq(a)) && next(colour) && next(is_shape_token))) return false;
    }
    return next(eq(stop)) && i == c.size();
}

inline std::string text(const caption& c) {
    std::string out;
    for (int t : c) {
        if (t == bos || t == pad) continue;
        if (!out.empty() && t != stop) out += ' ';
        out += words[t];
    }
    return out;
}

struct world_options {
    bool biased = true;
    double partner_rate = 0.85;  // biased world: P(partner present | shape present)
    double pixel_noise = 0.06;   // sensor noise of every image
};

/// Draws scenes and renders them. Deterministic for a given seed.
class world {
public:
    world(std::uint64_t seed, world_options o) : rng_(seed), o_(o) {}

    scene sample_scene() {
        std::vector<int> shapes;
        if (o_.biased) {
            // One or two anchors, each followed by its partner with probability partner_rate.
            const int anchors = 1 + static_cast<int>(uniform() < 0.4);
            for (int k = 0; k < anchors && static_cast<int>(shapes.size()) < max_objects; ++k) {
                int s;
                do s = pick(num_shapes);
                while (std::count(shapes.begin(), shapes.end(), s));
                shapes.push_back(s);
                if (static_cast<int>(shapes.size()) < max_objects && !std::count(shapes.begin(), shapes.end(), partner(s)) &&
                    uniform() < o_.partner_rate)
                    shapes.push_back(partner(s));
            }
        } else {
            const int n = 1 + pick(max_objects);
            while (static_cast<int>(shapes.size()) < n) {
                const int s = pick(num_shapes);
                if (!std::count(shapes.begin(), shapes.end(), s)) shapes.push_back(s);
            }
        }
        std::sort(shapes.begin(), shapes.end());
        scene sc;
        for (int s : shapes) {
            object ob{s, pick(num_colours), 0, 0};
            // Rejection sampling of a free 5×5 spot (with a one-pixel gap) anywhere in the image.
            for (int tries = 0;; ++tries) {
                ob.x = pick(image_size - glyph + 1);
                ob.y = pick(image_size - glyph + 1);
                const bool clear = std::none_of(sc.objects.begin(), sc.objects.end(), [&](const object& p) {
                    return std::abs(p.x - ob.x) <= glyph && std::abs(p.y - ob.y) <= glyph;
                });
                if (clear || tries > 200) break;
            }
            sc.objects.push_back(ob);
        }
        return sc;
    }

    /// CHW float image in [0, 1].
    std::vector<float> render(const scene& sc) {
        static constexpr float palette[num_colours][3] = {
            {0.9f, 0.15f, 0.1f}, {0.15f, 0.8f, 0.2f}, {0.15f, 0.3f, 0.95f}, {0.95f, 0.85f, 0.1f}};
        std::vector<float> img(pixels);
        std::normal_distribution<float> noise(0.0f, static_cast<float>(o_.pixel_noise));
        for (int c = 0; c < channels; ++c)
            for (int i = 0; i < image_size * image_size; ++i) img[c * image_size * image_size + i] = 0.35f;
        for (const object& ob : sc.objects)
            for (int dy = 0; dy < glyph; ++dy)
                for (int dx = 0; dx < glyph; ++dx)
                    if (ink(ob.shape, dx, dy))
                        for (int c = 0; c < channels; ++c)
                            img[(c * image_size + ob.y + dy) * image_size + ob.x + dx] = palette[ob.colour][c];
        for (float& v : img) v = std::clamp(v + noise(rng_), 0.0f, 1.0f);
        return img;
    }

    std::mt19937_64& rng() { return rng_; }

private:
    static bool ink(int shape, int x, int y) {
        static constexpr const char* glyphs[num_shapes][glyph] = {
            {"#####", "#####", "#####", "#####", "#####"},  // square
            {".###.", "#####", "#####", "#####", ".###."},  // circle
            {"..#..", ".###.", ".###.", "#####", "#####"},  // triangle
            {"..#..", "..#..", "#####", "..#..", "..#.."},  // cross
            {".....", "#####", "#####", ".....", "....."},  // bar
            {"#####", "#...#", "#...#", "#...#", "#####"},  // ring
        };
        return glyphs[shape][y][x] == '#';
    }
    int pick(int n) { return std::uniform_int_distribution<int>(0, n - 1)(rng_); }
    double uniform() { return std::uniform_real_distribution<double>(0, 1)(rng_); }

    std::mt19937_64 rng_;
    world_options o_;
};

/// Whether token t names a shape the scene does not hold (a hallucinated object).
inline bool hallucinated(const scene& sc, int t) { return is_shape_token(t) && !sc.has(t - first_shape); }
inline int hallucinations(const scene& sc, const caption& c) {
    return static_cast<int>(std::count_if(c.begin(), c.end(), [&](int t) { return hallucinated(sc, t); }));
}

/// The minimal correction of a grammatical caption of `sc`, as an annotator would write it: each
/// mention of an absent shape becomes a present shape the caption does not mention yet (the first
/// such in canonical order, with its colour), or its clause is removed when none is left; the
/// colour of every mention of a present shape is set to that object's colour. Mentions keep their
/// order, so chosen and rejected differ only in the corrected words. Needs `grammatical(said)`.
inline caption correct(const scene& sc, const caption& said) {
    auto colour_of = [&](int shape) {
        for (const object& o : sc.objects)
            if (o.shape == shape) return o.colour;
        return -1;
    };
    std::vector<bool> mentioned(num_shapes, false);
    for (int t : said)
        if (is_shape_token(t) && !hallucinated(sc, t)) mentioned[t - first_shape] = true;
    std::vector<object> kept;
    // Clauses "a colour shape" start after BOS "there is" and every "and".
    for (std::size_t i = 3; i + 2 < said.size(); i += 4) {
        int shape = said[i + 2] - first_shape;
        if (!sc.has(shape)) {
            shape = -1;
            for (const object& o : sc.objects)
                if (!mentioned[o.shape]) {
                    shape = o.shape;
                    break;
                }
            if (shape < 0) continue;  // nothing left to name: the clause goes
            mentioned[shape] = true;
        }
        kept.push_back({shape, colour_of(shape), 0, 0});
    }
    return describe(kept);
}

/// A preference pair: a caption of the image that names no absent shape (chosen) and one that
/// names at least one (rejected). `absent` marks the shapes the image does not hold, so a reader
/// can tell which tokens of either caption are hallucinated objects.
struct preference_pair {
    std::vector<float> image;
    caption chosen, rejected;
    std::array<bool, num_shapes> absent{};
    bool hallucinated(int t) const { return is_shape_token(t) && absent[t - first_shape]; }
};

inline std::array<bool, num_shapes> absent_shapes(const scene& sc) {
    std::array<bool, num_shapes> out{};
    for (int s = 0; s < num_shapes; ++s) out[s] = !sc.has(s);
    return out;
}

/// The swapped construction (`--pairs swapped`): chosen = the image's caption, rejected = the same
/// caption with one object's shape replaced by an absent one — the partner of a present shape when
/// that partner is absent (the hallucination the biased prior produces), otherwise any absent
/// shape. Off-policy: the rejected captions are not ones the model itself produces.
inline preference_pair make_pair(world& w, const scene& sc) {
    preference_pair p;
    p.image = w.render(sc);
    p.absent = absent_shapes(sc);
    p.chosen = describe(sc);
    auto& rng = w.rng();
    std::vector<int> absent_partners, absent;
    for (int s = 0; s < num_shapes; ++s)
        if (!sc.has(s)) {
            absent.push_back(s);
            if (sc.has(partner(s))) absent_partners.push_back(s);
        }
    const auto& pool = absent_partners.empty() ? absent : absent_partners;
    const int replacement = pool[std::uniform_int_distribution<std::size_t>(0, pool.size() - 1)(rng)];
    std::vector<object> objects = sc.objects;
    // Replace an object other than the one whose partner we hallucinate, so the prior's cue stays.
    std::vector<std::size_t> candidates;
    for (std::size_t i = 0; i < objects.size(); ++i)
        if (objects[i].shape != partner(replacement) || objects.size() == 1) candidates.push_back(i);
    const std::size_t victim = candidates[std::uniform_int_distribution<std::size_t>(0, candidates.size() - 1)(rng)];
    objects[victim].shape = replacement;
    std::sort(objects.begin(), objects.end(), [](const object& x, const object& y) { return x.shape < y.shape; });
    p.rejected = describe(objects);
    return p;
}

}  // namespace toy
