#pragma once
// Object hallucination metrics of greedy captions (Rohrbach et al. 2018, CHAIR), on shape nouns:
//   CHAIR_i = mentioned objects not in the image / mentioned objects
//   CHAIR_s = captions with at least one such object / captions
//   recall  = objects in the image that the caption mentions / objects in the image
// Each object counts once per caption, as in CHAIR.

#include <cmath>
#include <set>
#include <vector>

#include "world.hpp"

namespace toy {

struct hallucination_metrics {
    double chair_i = 0, chair_s = 0, recall = 0;
    double mentions_per_caption = 0;
    double well_formed = 0;  // fraction of captions that parse as the caption grammar
    double cooccurrence = 0; // share of hallucinated mentions that are the partner of a present shape
};

inline hallucination_metrics measure(const std::vector<scene>& scenes, const std::vector<caption>& captions) {
    hallucination_metrics m;
    double partner_hallucinations = 0;
    double mentioned = 0, hallucinated = 0, present = 0, recalled = 0, bad_captions = 0, formed = 0;
    for (std::size_t i = 0; i < scenes.size(); ++i) {
        std::set<int> said;
        for (int t : captions[i])
            if (is_shape_token(t)) said.insert(t - first_shape);
        bool any = false;
        for (int s : said) {
            mentioned += 1;
            if (!scenes[i].has(s)) {
                hallucinated += 1;
                partner_hallucinations += scenes[i].has(partner(s)) ? 1 : 0;
                any = true;
            }
        }
        for (const object& o : scenes[i].objects) {
            present += 1;
            recalled += said.count(o.shape) ? 1 : 0;
        }
        bad_captions += any ? 1 : 0;
        formed += grammatical(captions[i]) ? 1 : 0;
    }
    const double n = static_cast<double>(scenes.size());
    m.chair_i = mentioned > 0 ? hallucinated / mentioned : 0.0;
    m.chair_s = n > 0 ? bad_captions / n : 0.0;
    m.recall = present > 0 ? recalled / present : 0.0;
    m.mentions_per_caption = n > 0 ? mentioned / n : 0.0;
    m.well_formed = n > 0 ? formed / n : 0.0;
    m.cooccurrence = hallucinated > 0 ? partner_hallucinations / hallucinated : 0.0;
    return m;
}

struct mean_std {
    double mean = 0, std = 0;
};
inline mean_std summarise(const std::vector<double>& x) {
    mean_std r;
    if (x.empty()) return r;
    for (double v : x) r.mean += v;
    r.mean /= static_cast<double>(x.size());
    if (x.size() > 1) {
        for (double v : x) r.std += (v - r.mean) * (v - r.mean);
        r.std = std::sqrt(r.std / static_cast<double>(x.size() - 1));  // sample standard deviation
    }
    return r;
}

}  // namespace toy
