// toy_lvlm: a tiny vision-language model trained end to end in C++ — SFT, then DPO or TPO from
// the same checkpoint — and its object hallucination measured on held-out scenes.
//
//   toy_lvlm [--seeds N] [--first-seed S] [--jobs J] [--sft-steps N] [--pref-steps N]
//            [--pref-lr X] [--beta X] [--noise-step K] [--pairs on-policy|swapped] [--out DIR] ...
//   (--help lists every flag)

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <memory>
#include <mutex>
#include <stdexcept>
#include <string>
#include <thread>
#include <unistd.h>

#define TOY_PLOT_IMPLEMENTATION
#include "plot.hpp"
#include "sweep.hpp"
#include "train.hpp"

namespace {

struct cli {
    toy::settings s;
    int seeds = 5;
    std::uint64_t first_seed = 1;
    int jobs = 2;
    std::string out = "out/toy_lvlm";
    bool sweep = false;
    std::vector<double> lrs = toy::default_lr_grid();
    std::vector<toy::variant> methods = toy::frontier_variants();
};

[[noreturn]] void usage(const char* why) {
    std::fprintf(stderr,
                 "toy_lvlm: %s\nusage: toy_lvlm [--seeds N] [--first-seed S] [--jobs J] [--sft-steps N] "
                 "[--pref-steps N] [--pref-lr X] [--beta X] [--noise-step K] [--score logit|prob|logprob] [--detach-weights 0|1]\n"
                 "                [--form additive|multiplicative] [--sft-weight X] [--pairs on-policy|swapped] [--sample-tries N]\n"
                 "                [--schedule constant|cosine] [--out DIR]\n"
                 "       toy_lvlm --sweep [--lrs X,Y,...] [--methods dpo,tpo,tpo-detached,tpo-logprob,tpo-mult-detached] [same flags]\n"
                 "                the learning-rate frontier of DPO, TPO and its variants (DPO is always run: the comparisons need it)\n",
                 why);
    std::exit(2);
}

cli parse(int argc, char** argv) {
    cli c;
    for (int i = 1; i < argc; ++i) {
        const std::string k = argv[i];
        if (k == "-h" || k == "--help") usage("trains SFT, DPO and TPO on a procedural world and measures hallucination");
        if (k == "--sweep") {
            c.sweep = true;
            continue;
        }
        if (i + 1 >= argc) usage(("missing value after " + k).c_str());
        const std::string v = argv[++i];
        if (k == "--methods") {
            const auto all = toy::frontier_variants();
            c.methods = {all.front()};
            std::size_t from = 0;
            while (from <= v.size()) {
                const std::size_t comma = std::min(v.find(',', from), v.size());
                const std::string item = v.substr(from, comma - from);
                const auto it = std::find_if(all.begin(), all.end(), [&](const auto& m) { return toy::method_key(m) == item; });
                if (it == all.end())
                    usage(("bad value '" + item + "' for --methods, expected dpo, tpo, tpo-detached, tpo-logprob or tpo-mult-detached").c_str());
                if (std::none_of(c.methods.begin(), c.methods.end(), [&](const auto& m) { return m.name == it->name; })) c.methods.push_back(*it);
                from = comma + 1;
            }
            continue;
        }
        if (k == "--lrs") {
            c.lrs.clear();
            std::size_t from = 0;
            while (from <= v.size()) {
                const std::size_t comma = std::min(v.find(',', from), v.size());
                const std::string item = v.substr(from, comma - from);
                char* end = nullptr;
                const double lr = std::strtod(item.c_str(), &end);
                if (item.empty() || *end != '\0' || !(lr > 0) || (!c.lrs.empty() && lr <= c.lrs.back()))
                    usage(("bad value '" + v + "' for --lrs, expected ascending positive rates separated by commas").c_str());
                c.lrs.push_back(lr);
                from = comma + 1;
            }
            continue;
        }
        char* end = nullptr;
        const double x = std::strtod(v.c_str(), &end);
        const bool number = end && *end == '\0' && !v.empty();
        auto need = [&](bool ok) {
            if (!ok || !number) usage(("bad value '" + v + "' for " + k).c_str());
        };
        if (k == "--seeds") need(x >= 1), c.seeds = static_cast<int>(x);
        else if (k == "--first-seed") need(x >= 0), c.first_seed = static_cast<std::uint64_t>(x);
        else if (k == "--jobs") need(x >= 1), c.jobs = static_cast<int>(x);
        else if (k == "--sft-steps") need(x >= 1), c.s.sft_steps = static_cast<int>(x);
        else if (k == "--pref-steps") need(x >= 1), c.s.pref_steps = static_cast<int>(x);
        else if (k == "--pref-lr") need(x > 0), c.s.pref_lr = x;
        else if (k == "--beta") need(x > 0), c.s.beta = x;
        else if (k == "--noise-step") need(x >= 0 && x < 1000), c.s.noise_step = static_cast<int>(x);
        else if (k == "--out") c.out = v;
        else if (k == "--score") c.s.score = tpo::parse_score_kind(v);
        else if (k == "--form") c.s.form = tpo::parse_sequence_form(v);
        else if (k == "--sft-weight") need(x >= 0), c.s.sft_weight = x;
        else if (k == "--detach-weights") need(x == 0 || x == 1), c.s.detach_weights = x == 1;
        else if (k == "--sample-tries") need(x >= 1), c.s.sample_tries = static_cast<int>(x);
        else if (k == "--pairs") {
            if (v != "on-policy" && v != "swapped") usage(("bad value '" + v + "' for --pairs, expected on-policy or swapped").c_str());
            c.s.pairs = v == "swapped" ? toy::pair_source::swapped : toy::pair_source::on_policy;
        } else if (k == "--schedule") {
            if (v != "constant" && v != "cosine") usage(("bad value '" + v + "' for --schedule, expected constant or cosine").c_str());
            c.s.cosine = v == "cosine";
        }
        else usage(("unknown option " + k).c_str());
    }
    return c;
}

/// One status line for all concurrently running seeds (redrawn in place on a terminal).
class progress_board {
public:
    explicit progress_board(int seeds) : lines_(seeds), tty_(isatty(2)) {}
    void update(int seed_index, const char* phase, int step, int total, double loss) {
        std::lock_guard<std::mutex> lock(mutex_);
        char buf[96];
        std::snprintf(buf, sizeof buf, "seed %d %s %4d/%-4d loss %.3f", seed_index + 1, phase, step, total, loss);
        lines_[seed_index] = buf;
        const auto now = std::chrono::steady_clock::now();
        const bool last = step == total;
        if (!last && now - shown_ < std::chrono::milliseconds(tty_ ? 200 : 10000)) return;
        shown_ = now;
        std::string all;
        for (const auto& l : lines_)
            if (!l.empty()) all += (all.empty() ? "" : " | ") + l;
        if (tty_) std::fprintf(stderr, "\r\033[K%s", all.c_str());
        else std::fprintf(stderr, "%s\n", all.c_str());
        if (last && tty_ && std::string(phase) == "TPO") std::fprintf(stderr, "\n");
    }

private:
    std::mutex mutex_;
    std::vector<std::string> lines_;
    bool tty_;
    std::chrono::steady_clock::time_point shown_{};
};

/// A KL value: small and spanning decades, so significant digits rather than fixed decimals.
std::string kl_pm(const std::vector<double>& x) {
    const toy::mean_std m = toy::summarise(x);
    char buf[64];
    std::snprintf(buf, sizeof buf, "%.3g ± %.2g", m.mean, m.std);
    return buf;
}

std::string pm(const std::vector<double>& x, double scale = 100.0, int decimals = 1) {
    const toy::mean_std m = toy::summarise(x);
    char buf[64];
    std::snprintf(buf, sizeof buf, "%5.*f ± %4.*f", decimals, scale * m.mean, decimals, scale * m.std);
    return buf;
}

/// Mean over seeds of a curve, smoothed by a moving average of `window` points.
toy::plot::series average_curve(const std::vector<std::vector<toy::curve_point>>& runs, const std::string& name,
                                toy::plot::rgb colour, int window) {
    toy::plot::series s{name, colour, {}, {}, {}, {}, false, false};
    if (runs.empty()) return s;
    const std::size_t n = runs.front().size();
    std::vector<double> mean(n, 0), lo(n, 1e300), hi(n, -1e300);
    for (const auto& r : runs)
        for (std::size_t i = 0; i < n && i < r.size(); ++i) {
            double acc = 0;
            int k = 0;
            for (int j = std::max(0, static_cast<int>(i) - window + 1); j <= static_cast<int>(i); ++j, ++k) acc += r[j].value;
            const double v = acc / k;
            mean[i] += v / runs.size();
            lo[i] = std::min(lo[i], v);
            hi[i] = std::max(hi[i], v);
        }
    for (std::size_t i = 0; i < n; ++i) {
        s.x.push_back(runs.front()[i].step);
        s.y.push_back(mean[i]);
    }
    if (runs.size() > 1) s.low = lo, s.high = hi;
    return s;
}

void heatmap(const std::vector<toy::caption_weights>& before, const std::vector<toy::caption_weights>& after, double a,
             int k, const std::string& path) {
    using namespace toy::plot;
    const int cell_w = 62, cell_h = 30, left = 90;
    const int w = left + cell_w * (toy::max_length - 1) + 20;
    const int h = 70 + static_cast<int>(before.size() + after.size()) * (2 * cell_h + 16) + 2 * 24 + 40;
    canvas cv(w, h);
    cv.text(10, 8, "TPO token weights c (clean vs diffusion-noised image, k=" + std::to_string(k) + ")", black, 2);
    cv.text(10, 34, "red: c above " + short_number(0.5 + a) + " (weighs more), blue: below; boxed: the hallucinated object in the rejected caption",
            black);
    int y = 56;
    for (int panel = 0; panel < 2; ++panel) {
        const auto& examples = panel == 0 ? before : after;
        cv.text(10, y, panel == 0 ? "at the SFT checkpoint (where TPO starts)" : "after TPO", black, 2);
        y += 24;
        for (const auto& ex : examples) {
            for (int side = 0; side < 2; ++side) {
                const toy::caption& c = side == 0 ? ex.chosen : ex.rejected;
                const auto& wts = side == 0 ? ex.chosen_weight : ex.rejected_weight;
                cv.text(10, y + 10, side == 0 ? "chosen" : "rejected", black, 1);
                for (std::size_t t = 0; t < wts.size(); ++t) {
                    const int x0 = left + static_cast<int>(t) * cell_w;
                    cv.rect(x0, y, x0 + cell_w - 2, y + cell_h - 2, diverging(wts[t], a, 1 + a));
                    if (side == 1 && toy::is_shape_token(c[t + 1]) && ex.absent[c[t + 1] - toy::first_shape]) {
                        cv.line(x0, y, x0 + cell_w - 3, y, black, 2);
                        cv.line(x0, y + cell_h - 3, x0 + cell_w - 3, y + cell_h - 3, black, 2);
                        cv.line(x0, y, x0, y + cell_h - 3, black, 2);
                        cv.line(x0 + cell_w - 3, y, x0 + cell_w - 3, y + cell_h - 3, black, 2);
                    }
                    cv.text(x0 + 4, y + 4, toy::words[c[t + 1]], black);
                    cv.text(x0 + 4, y + 16, short_number(wts[t]), black);
                }
                y += cell_h;
            }
            y += 16;
        }
    }
    // Colour bar.
    for (int i = 0; i < 200; ++i) cv.rect(left + i, y, left + i + 1, y + 12, diverging(a + i / 199.0, a, 1 + a));
    cv.text(left - 30, y + 2, short_number(a), black);
    cv.text(left + 205, y + 2, short_number(1 + a), black);
    if (!cv.save(path)) std::fprintf(stderr, "toy_lvlm: could not write %s\n", path.c_str());
}

template <class Pick>
std::vector<double> sft_column_pairs(const std::vector<toy::pair_stats>& all, Pick pick) {
    std::vector<double> x;
    for (const auto& p : all) x.push_back(static_cast<double>(pick(p)));
    return x;
}

/// CHAIR_i, CHAIR_s and recall against log10 KL (held-out captions), one line per method through
/// its learning rates, mean ± std over seeds in both axes' metric; SFT as a band.
void frontier_plot(const toy::frontier_result& f, const std::string& path) {
    using namespace toy::plot;
    const rgb palette[] = {dpo_colour, tpo_colour, {255, 127, 14}, {148, 103, 189}, {140, 86, 75}};
    const auto all = toy::frontier_variants();
    auto colour_of = [&](const toy::variant& v) {
        for (std::size_t i = 0; i < all.size(); ++i)
            if (all[i].name == v.name) return palette[i % 5];
        return black;
    };
    const int panel_w = 560, panel_h = 480;
    canvas cv(3 * panel_w, panel_h + 40);
    cv.text(10, 8, "Learning-rate frontier: hallucination against KL from the SFT model (mean +- std over seeds; one point per learning rate)", black, 2);
    const std::pair<const char*, double toy::hallucination_metrics::*> metrics[] = {
        {"CHAIR_i (%, lower is better)", &toy::hallucination_metrics::chair_i},
        {"CHAIR_s (%, lower is better)", &toy::hallucination_metrics::chair_s},
        {"recall (%, higher is better)", &toy::hallucination_metrics::recall}};
    for (int k = 0; k < 3; ++k) {
        const auto member = metrics[k].second;
        std::vector<series> all;
        double xmin = 1e300, xmax = -1e300;
        for (std::size_t v = 0; v < f.variants.size(); ++v) {
            series s{f.variants[v].name, colour_of(f.variants[v]), {}, {}, {}, {}, true, true};
            for (std::size_t g = 0; g < f.lrs.size(); ++g) {
                std::vector<double> kl, m;
                for (const auto& p : f.points[v][g]) {
                    kl.push_back(p.kl.held_out);
                    m.push_back(100 * (p.m.*member));
                }
                const double mean_kl = toy::summarise(kl).mean;
                if (!(mean_kl > 0)) continue;
                const toy::mean_std ms = toy::summarise(m);
                s.x.push_back(std::log10(mean_kl));
                s.y.push_back(ms.mean);
                s.low.push_back(ms.mean - ms.std);
                s.high.push_back(ms.mean + ms.std);
                xmin = std::min(xmin, s.x.back());
                xmax = std::max(xmax, s.x.back());
            }
            all.push_back(std::move(s));
        }
        std::vector<double> sft;
        for (const auto& m : f.sft) sft.push_back(100 * (m.*member));
        const toy::mean_std ss = toy::summarise(sft);
        if (xmin <= xmax)
            all.insert(all.begin(), series{"SFT", sft_colour, {xmin, xmax}, {ss.mean, ss.mean}, {ss.mean - ss.std, ss.mean - ss.std},
                                           {ss.mean + ss.std, ss.mean + ss.std}, false, false});
        line_chart(cv, k * panel_w, 36, panel_w, panel_h, metrics[k].first, "log10 mean per-token KL(policy || SFT), held-out captions", all);
    }
    if (!cv.save(path)) std::fprintf(stderr, "toy_lvlm: could not write %s\n", path.c_str());
}

/// Runs task(0 .. n−1) on `jobs` threads; rethrows the first failure after all have stopped.
template <class Task>
void parallel_for(int n, int jobs, Task task) {
    std::atomic<int> next{0};
    std::mutex error_mutex;
    std::string failure;
    std::vector<std::thread> workers;
    for (int j = 0; j < std::min(jobs, n); ++j)
        workers.emplace_back([&] {
            for (int i; (i = next++) < n;) {
                try {
                    task(i);
                } catch (const std::exception& ex) {
                    std::lock_guard<std::mutex> lock(error_mutex);
                    if (failure.empty()) failure = ex.what();
                }
            }
        });
    for (auto& w : workers) w.join();
    if (!failure.empty()) throw std::runtime_error(failure);
}

std::string signed_pm(const std::vector<double>& x) {
    const toy::mean_std m = toy::summarise(x);
    char buf[64];
    std::snprintf(buf, sizeof buf, "%+.1f ± %.1f", 100 * m.mean, 100 * m.std);
    return buf;
}

int sweep(const cli& c) {
    const auto start = std::chrono::steady_clock::now();
    toy::settings base = c.s;
    base.probe_images = 0;  // no training curves: only end points count here
    toy::frontier_result f;
    f.lrs = c.lrs;
    f.variants = c.methods;  // DPO first
    const int S = c.seeds, G = static_cast<int>(f.lrs.size()), V = static_cast<int>(f.variants.size());
    std::printf("toy_lvlm --sweep: %d seeds × %d methods × %d learning rates (", S, V, G);
    for (int i = 0; i < G; ++i) std::printf("%s%g", i ? ", " : "", f.lrs[i]);
    std::printf("), SFT %d steps × %d, preference %d steps × %d pairs, %s pairs from %d images, %s schedule, β = %g, %d jobs\n",
                base.sft_steps, base.sft_batch, base.pref_steps, base.pref_batch,
                base.pairs == toy::pair_source::on_policy ? "on-policy" : "swapped", base.pref_pairs,
                base.cosine ? "cosine" : "constant", base.beta, c.jobs);
    std::fflush(stdout);

    std::vector<std::unique_ptr<toy::experiment>> experiments(S);
    std::vector<toy::run_result> prepared(S);
    std::fprintf(stderr, "sweep: SFT and preference pairs of %d seeds\n", S);
    parallel_for(S, c.jobs, [&](int i) {
        toy::settings s = base;
        s.seed = c.first_seed + static_cast<std::uint64_t>(i);
        experiments[i] = std::make_unique<toy::experiment>(s);
        experiments[i]->prepare(prepared[i], nullptr);
    });
    for (const auto& r : prepared) {
        f.sft.push_back(r.sft);
        f.pairs.push_back(r.pairs);
    }
    f.points.assign(V, std::vector<std::vector<toy::run_point>>(G, std::vector<toy::run_point>(S)));
    const int runs = S * V * G;
    std::atomic<int> done{0};
    std::mutex print_mutex;
    parallel_for(runs, c.jobs, [&](int k) {
        const int s = k % S, g = (k / S) % G, v = k / (S * G);
        f.points[v][g][s] = experiments[s]->point(f.variants[v], f.lrs[g], nullptr);
        const int n = ++done;
        std::lock_guard<std::mutex> lock(print_mutex);
        if (n % std::max(1, runs / 20) == 0 || n == runs)
            std::fprintf(stderr, "sweep: %d/%d preference runs, %.0f s\n", n, runs,
                         std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count());
    });
    const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();

    auto over_seeds = [&](int v, int g, auto pick) {
        std::vector<double> x;
        for (int s = 0; s < S; ++s) x.push_back(pick(f.points[v][g][s]));
        return x;
    };
    auto sft_column = [&](auto pick) {
        std::vector<double> x;
        for (const auto& m : f.sft) x.push_back(pick(m));
        return x;
    };
    std::vector<double> sft_i = sft_column([](const auto& m) { return m.chair_i; });
    std::printf("\nPreference pairs: %s built of %d images per seed (%s skipped), %s absent-shape mentions per rejected caption\n",
                pm(sft_column_pairs(f.pairs, [](const auto& p) { return p.pairs; }), 1.0, 0).c_str(), base.pref_pairs,
                pm(sft_column_pairs(f.pairs, [](const auto& p) { return p.skipped; }), 1.0, 0).c_str(),
                pm(sft_column_pairs(f.pairs, [](const auto& p) { return p.hallucinated_per_rejected; }), 1.0, 2).c_str());
    std::printf("\nHeld-out scenes (%d per seed), greedy captions; mean ± std over %d seeds, %%; KL = mean per-token "
                "KL(π ‖ π_SFT) on the held-out captions / on %d pairs\n\n",
                base.eval_images, S, base.kl_pairs);
    std::printf("| method | lr | KL held-out | KL pairs | CHAIR_i ↓ | CHAIR_s ↓ | recall ↑ | objects/caption | CHAIR_i − SFT (paired) | reward acc. (last 50) |\n");
    std::printf("|---|---|---|---|---|---|---|---|---|---|\n");
    std::printf("| SFT | — | 0 | 0 | %s | %s | %s | %s | — | — |\n", pm(sft_i).c_str(),
                pm(sft_column([](const auto& m) { return m.chair_s; })).c_str(),
                pm(sft_column([](const auto& m) { return m.recall; })).c_str(),
                pm(sft_column([](const auto& m) { return m.mentions_per_caption; }), 1.0).c_str());
    for (int v = 0; v < V; ++v)
        for (int g = 0; g < G; ++g) {
            std::vector<double> delta;
            for (int s = 0; s < S; ++s) delta.push_back(f.points[v][g][s].m.chair_i - sft_i[s]);
            std::printf("| %s | %g | %s | %s | %s | %s | %s | %s | %s | %s |\n", f.variants[v].name.c_str(), f.lrs[g],
                        kl_pm(over_seeds(v, g, [](const auto& p) { return p.kl.held_out; })).c_str(),
                        kl_pm(over_seeds(v, g, [](const auto& p) { return p.kl.pairs; })).c_str(),
                        pm(over_seeds(v, g, [](const auto& p) { return p.m.chair_i; })).c_str(),
                        pm(over_seeds(v, g, [](const auto& p) { return p.m.chair_s; })).c_str(),
                        pm(over_seeds(v, g, [](const auto& p) { return p.m.recall; })).c_str(),
                        pm(over_seeds(v, g, [](const auto& p) { return p.m.mentions_per_caption; }), 1.0).c_str(),
                        signed_pm(delta).c_str(), pm(over_seeds(v, g, [](const auto& p) { return p.accuracy; })).c_str());
        }

    // The headline rule sees DPO's recall and SFT's, nothing else.
    std::vector<std::vector<double>> dpo_recall;
    for (int g = 0; g < G; ++g) dpo_recall.push_back(over_seeds(0, g, [](const auto& p) { return p.m.recall; }));
    const std::vector<double> sft_recall = sft_column([](const auto& m) { return m.recall; });
    const std::size_t h = toy::headline_index(dpo_recall, sft_recall);
    const toy::mean_std sr = toy::summarise(sft_recall);
    std::printf("\nHeadline rule (on DPO alone): the largest lr whose DPO recall is within one std of SFT's (%.1f ± %.1f):\n ",
                100 * sr.mean, 100 * sr.std);
    for (int g = 0; g < G; ++g) {
        const double m = toy::summarise(dpo_recall[g]).mean;
        std::printf(" %g: %.1f%s", f.lrs[g], 100 * m, std::abs(m - sr.mean) <= sr.std ? " (within)" : "");
    }
    std::printf("\n  → headline learning rate %g%s\n", f.lrs[h],
                std::abs(toy::summarise(dpo_recall[h]).mean - sr.mean) <= sr.std ? "" : " (no rate qualified: the smallest)");

    std::printf("\nAt the headline lr %g, paired differences over seeds, method − DPO (points; CHAIR_i / CHAIR_s / recall):\n", f.lrs[h]);
    for (int v = 1; v < V; ++v) {
        std::vector<double> di, ds, dr;
        for (int s = 0; s < S; ++s) {
            di.push_back(f.points[v][h][s].m.chair_i - f.points[0][h][s].m.chair_i);
            ds.push_back(f.points[v][h][s].m.chair_s - f.points[0][h][s].m.chair_s);
            dr.push_back(f.points[v][h][s].m.recall - f.points[0][h][s].m.recall);
        }
        std::printf("  %-18s %s / %s / %s\n", f.variants[v].name.c_str(), signed_pm(di).c_str(), signed_pm(ds).c_str(), signed_pm(dr).c_str());
    }

    std::printf("\nAt equal KL: method − DPO interpolated (linear in log KL along the same seed's DPO line) at the method's KL; "
                "mean ± std over the seeds whose KL lies inside DPO's range, points\n\n");
    std::printf("| method | lr | seeds | CHAIR_i | CHAIR_s | recall |\n|---|---|---|---|---|---|\n");
    for (int v = 1; v < V; ++v)
        for (int g = 0; g < G; ++g) {
            const auto di = toy::equal_kl_differences(f, v, g, [](const auto& m) { return m.chair_i; });
            if (di.empty()) {
                std::printf("| %s | %g | 0 | — | — | — |\n", f.variants[v].name.c_str(), f.lrs[g]);
                continue;
            }
            std::printf("| %s | %g | %zu | %s | %s | %s |\n", f.variants[v].name.c_str(), f.lrs[g], di.size(), signed_pm(di).c_str(),
                        signed_pm(toy::equal_kl_differences(f, v, g, [](const auto& m) { return m.chair_s; })).c_str(),
                        signed_pm(toy::equal_kl_differences(f, v, g, [](const auto& m) { return m.recall; })).c_str());
        }

    std::filesystem::create_directories(c.out);
    {
        std::ofstream csv(c.out + "/sweep.csv");
        csv << "seed,method,lr,kl_held_out,kl_pairs,chair_i,chair_s,recall,objects_per_caption,grammatical,reward_accuracy\n";
        for (int s = 0; s < S; ++s) {
            const auto& m = f.sft[s];
            csv << c.first_seed + s << ",SFT,0,0,0," << m.chair_i << ',' << m.chair_s << ',' << m.recall << ','
                << m.mentions_per_caption << ',' << m.well_formed << ",\n";
            for (int v = 0; v < V; ++v)
                for (int g = 0; g < G; ++g) {
                    const auto& p = f.points[v][g][s];
                    csv << c.first_seed + s << ',' << f.variants[v].name << ',' << f.lrs[g] << ',' << p.kl.held_out << ','
                        << p.kl.pairs << ',' << p.m.chair_i << ',' << p.m.chair_s << ',' << p.m.recall << ','
                        << p.m.mentions_per_caption << ',' << p.m.well_formed << ',' << p.accuracy << '\n';
                }
        }
    }
    frontier_plot(f, c.out + "/frontier.png");
    std::printf("\nFigure and raw numbers in %s/ (frontier.png, sweep.csv); %.0f s\n",
                std::filesystem::absolute(c.out).lexically_normal().c_str(), seconds);
    return 0;
}

}  // namespace

int main(int argc, char** argv) {
    const cli c = parse(argc, argv);
    if (c.sweep) {
        try {
            return sweep(c);
        } catch (const std::exception& ex) {
            std::fprintf(stderr, "\ntoy_lvlm: failed: %s\n", ex.what());
            return 1;
        }
    }
    const auto start = std::chrono::steady_clock::now();
    std::printf("toy_lvlm: %d seeds, SFT %d steps × %d, preference %d steps × %d pairs (%s pairs from %d images, lr %g%s, "
                "β = %g, a = %g, k = %d), %d jobs\n",
                c.seeds, c.s.sft_steps, c.s.sft_batch, c.s.pref_steps, c.s.pref_batch,
                c.s.pairs == toy::pair_source::on_policy ? "on-policy" : "swapped", c.s.pref_pairs, c.s.pref_lr,
                c.s.cosine ? " cosine" : " constant", c.s.beta, c.s.a, c.s.noise_step, c.jobs);
    std::fflush(stdout);

    std::vector<toy::run_result> results(c.seeds);
    progress_board board(c.seeds);
    std::atomic<int> next{0};
    std::vector<std::thread> workers;
    std::mutex error_mutex;
    std::string failure;
    for (int j = 0; j < std::min(c.jobs, c.seeds); ++j)
        workers.emplace_back([&] {
            for (int i; (i = next++) < c.seeds;) {
                try {
                    toy::settings s = c.s;
                    s.seed = c.first_seed + static_cast<std::uint64_t>(i);
                    toy::experiment e(s);
                    results[i] = e.run([&, i](const char* phase, int step, int total, double loss) {
                        board.update(i, phase, step, total, loss);
                    });
                } catch (const std::exception& ex) {
                    std::lock_guard<std::mutex> lock(error_mutex);
                    failure = ex.what();
                }
            }
        });
    for (auto& w : workers) w.join();
    if (!failure.empty()) {
        std::fprintf(stderr, "\ntoy_lvlm: failed: %s\n", failure.c_str());
        return 1;
    }
    const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();

    // ---- The table.
    auto column = [&](auto pick) {
        std::vector<double> v;
        for (const auto& r : results) v.push_back(pick(r));
        return v;
    };
    std::printf("\nHeld-out scenes (%d per seed, shapes drawn independently), greedy captions; mean ± std over %d seeds, %%\n\n",
                c.s.eval_images, c.seeds);
    std::printf("| model | CHAIR_i ↓ | CHAIR_s ↓ | recall ↑ | objects/caption | grammatical | partner share of hallucinations | KL held-out | KL pairs |\n");
    std::printf("|---|---|---|---|---|---|---|---|---|\n");
    const std::pair<const char*, toy::hallucination_metrics toy::run_result::*> rows[] = {
        {"base (init)", &toy::run_result::base}, {"SFT", &toy::run_result::sft}, {"DPO", &toy::run_result::dpo},
        {"TPO", &toy::run_result::tpo}, {"SFT, biased world", &toy::run_result::sft_in_distribution}};
    auto kl_cells = [&](const char* name) -> std::string {
        const bool dpo = std::string(name) == "DPO", tpo = std::string(name) == "TPO";
        if (!dpo && !tpo) return "— | —";
        const auto member = dpo ? &toy::run_result::dpo_kl : &toy::run_result::tpo_kl;
        return kl_pm(column([&](const auto& r) { return (r.*member).held_out; })) + " | " +
               kl_pm(column([&](const auto& r) { return (r.*member).pairs; }));
    };
    for (auto [name, member] : rows) {
        std::printf("| %-11s | %s | %s | %s | %s | %s | %s | %s |\n", name,
                    pm(column([&](const auto& r) { return (r.*member).chair_i; })).c_str(),
                    pm(column([&](const auto& r) { return (r.*member).chair_s; })).c_str(),
                    pm(column([&](const auto& r) { return (r.*member).recall; })).c_str(),
                    pm(column([&](const auto& r) { return (r.*member).mentions_per_caption; }), 1.0).c_str(),
                    pm(column([&](const auto& r) { return (r.*member).well_formed; })).c_str(),
                    pm(column([&](const auto& r) { return (r.*member).cooccurrence; })).c_str(), kl_cells(name).c_str());
    }
    std::printf("(KL: mean per-token KL(π ‖ π_SFT), teacher-forced on the held-out scenes' captions and on %d preference pairs' chosen and rejected captions)\n",
                c.s.kl_pairs);
    std::printf("Preference pairs (%s): %s built of %d images, %s skipped; %s absent-shape mentions per rejected caption, "
                "%s tokens changed per pair; %s of the sampled captions did not parse\n",
                c.s.pairs == toy::pair_source::on_policy ? "on-policy, SFT samples and their corrections" : "swapped",
                pm(column([&](const auto& r) { return r.pairs.pairs; }), 1.0, 0).c_str(), c.s.pref_pairs,
                pm(column([&](const auto& r) { return r.pairs.skipped; }), 1.0, 0).c_str(),
                pm(column([&](const auto& r) { return r.pairs.hallucinated_per_rejected; }), 1.0, 2).c_str(),
                pm(column([&](const auto& r) { return r.pairs.changed_per_pair; }), 1.0, 2).c_str(),
                pm(column([&](const auto& r) { return r.pairs.samples ? static_cast<double>(r.pairs.ungrammatical) / r.pairs.samples : 0.0; })).c_str());
    auto last_mean = [](const std::vector<toy::curve_point>& c, std::size_t n) {
        double acc = 0;
        const std::size_t from = c.size() > n ? c.size() - n : 0;
        for (std::size_t i = from; i < c.size(); ++i) acc += c[i].value;
        return c.size() > from ? acc / static_cast<double>(c.size() - from) : 0.0;
    };
    for (auto [name, member] : {std::pair{"DPO", &toy::run_result::dpo_curves}, std::pair{"TPO", &toy::run_result::tpo_curves}})
        std::printf("%s, last 50 steps: reward accuracy %s %%, chosen reward β·Δ_w %s, rejected reward β·Δ_l %s\n", name,
                    pm(column([&](const auto& r) { return last_mean((r.*member).accuracy, 50); })).c_str(),
                    pm(column([&](const auto& r) { return last_mean((r.*member).chosen_reward, 50); }), 1.0, 2).c_str(),
                    pm(column([&](const auto& r) { return last_mean((r.*member).rejected_reward, 50); }), 1.0, 2).c_str());
    std::printf("\nPer seed CHAIR_i (SFT → DPO / TPO):");
    for (const auto& r : results) std::printf("  %.1f → %.1f / %.1f", 100 * r.sft.chair_i, 100 * r.dpo.chair_i, 100 * r.tpo.chair_i);
    std::printf("\n");

    // ---- Token weights.
    auto weights_table = [&](const char* when, toy::weight_stats toy::run_result::*member) {
        std::printf("\nMean TPO weight c (a = %g, so c ∈ (%g, %g); 1 = image-independent) %s, 256 held-out pairs:\n", c.s.a,
                    c.s.a, 1 + c.s.a, when);
        std::printf("| caption | function words | attributes (colours) | objects (shapes) | hallucinated object |\n");
        std::printf("|---|---|---|---|---|\n");
        auto cell = [&](auto pick) { return pm(column([&](const auto& r) { return pick(r.*member); }), 1.0, 2); };
        std::printf("| chosen   | %s | %s | %s | — |\n", cell([](auto& w) { return w.chosen[0]; }).c_str(),
                    cell([](auto& w) { return w.chosen[1]; }).c_str(), cell([](auto& w) { return w.chosen[2]; }).c_str());
        std::printf("| rejected | %s | %s | %s (true ones) | %s |\n", cell([](auto& w) { return w.rejected[0]; }).c_str(),
                    cell([](auto& w) { return w.rejected[1]; }).c_str(),
                    cell([](auto& w) { return w.rejected_true_objects; }).c_str(),
                    cell([](auto& w) { return w.rejected_hallucinated; }).c_str());
    };
    weights_table("at the SFT checkpoint (TPO's starting weights)", &toy::run_result::weights_before);
    weights_table("after TPO", &toy::run_result::weights_after);

    std::printf("\nSample TPO captions (seed %llu):\n", static_cast<unsigned long long>(c.first_seed));
    for (const auto& [truth, said] : results.front().sample_captions)
        std::printf("  truth: %-55s TPO: %s\n", truth.c_str(), said.c_str());

    // ---- Figures and raw numbers.
    std::filesystem::create_directories(c.out);
    {
        using namespace toy::plot;
        canvas cv(1200, 800);
        std::vector<std::vector<toy::curve_point>> sft, dpo_loss, tpo_loss, dpo_acc, tpo_acc, dpo_chair, tpo_chair;
        for (const auto& r : results) {
            sft.push_back(r.sft_loss);
            dpo_loss.push_back(r.dpo_curves.loss);
            tpo_loss.push_back(r.tpo_curves.loss);
            dpo_acc.push_back(r.dpo_curves.accuracy);
            tpo_acc.push_back(r.tpo_curves.accuracy);
            dpo_chair.push_back(r.dpo_curves.chair_i);
            tpo_chair.push_back(r.tpo_curves.chair_i);
        }
        line_chart(cv, 0, 0, 600, 400, "SFT cross-entropy", "step", {average_curve(sft, "SFT", sft_colour, 25)});
        line_chart(cv, 600, 0, 600, 400, "preference loss", "step",
                   {average_curve(dpo_loss, "DPO", dpo_colour, 10), average_curve(tpo_loss, "TPO", tpo_colour, 10)});
        line_chart(cv, 0, 400, 600, 400, "reward accuracy", "step",
                   {average_curve(dpo_acc, "DPO", dpo_colour, 10), average_curve(tpo_acc, "TPO", tpo_colour, 10)});
        line_chart(cv, 600, 400, 600, 400, "CHAIR_i on probe scenes", "step",
                   {average_curve(dpo_chair, "DPO", dpo_colour, 1), average_curve(tpo_chair, "TPO", tpo_colour, 1)});
        if (!cv.save(c.out + "/curves.png")) std::fprintf(stderr, "toy_lvlm: could not write curves.png\n");
    }
    heatmap(results.front().examples_before, results.front().examples, c.s.a, c.s.noise_step, c.out + "/token_weights.png");
    {
        std::ofstream csv(c.out + "/results.csv");
        csv << "seed,model,chair_i,chair_s,recall,objects_per_caption,grammatical,kl_held_out,kl_pairs\n";
        for (int i = 0; i < c.seeds; ++i)
            for (auto [name, member] : rows) {
                const auto& m = results[i].*member;
                csv << c.first_seed + i << ',' << name << ',' << m.chair_i << ',' << m.chair_s << ',' << m.recall << ','
                    << m.mentions_per_caption << ',' << m.well_formed << ',';
                const std::string n = name;
                if (n == "DPO" || n == "TPO") {
                    const toy::divergence& d = n == "DPO" ? results[i].dpo_kl : results[i].tpo_kl;
                    csv << d.held_out << ',' << d.pairs;
                } else {
                    csv << ',';
                }
                csv << '\n';
            }
    }
    std::printf("\nFigures and raw numbers in %s/ (curves.png, token_weights.png, results.csv); %.0f s\n",
                std::filesystem::absolute(c.out).lexically_normal().c_str(), seconds);
    return 0;
}
