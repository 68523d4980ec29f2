// What the kernel harnesses share: their random source, the failure count, the per-case report
// and main()'s choice of cases.
//   HARNESS fixed [COUNT]      the fixed case list (its first COUNT cases)
//   HARNESS race               the cases for -fsanitize=thread (where the harness has them)
//   HARNESS random SEED COUNT  COUNT random cases (where the harness has them)
// Prints one line per case and "fails: N"; exits 1 if any case failed, 2 on bad arguments.
#pragma once

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <functional>
#include <random>
#include <string>
#include <vector>

namespace harness {

inline std::mt19937 rng;
inline int failures = 0;

inline float randn(float stddev = 1.0f) {
  static std::normal_distribution<float> normal(0.0f, 1.0f);
  return stddev * normal(rng);
}

inline int pick(int n) { return static_cast<int>(rng() % static_cast<unsigned>(n)); }

// Prints the case's label, runs it, and says "ok" when it added no failure.
template <class Body>
void report(const std::string& label, Body&& body) {
  std::printf("case %s\n", label.c_str());
  std::fflush(stdout);
  const int before = failures;
  body();
  if (failures == before) std::printf("  ok\n");
}

template <class Case>
struct CaseLists {
  std::vector<Case> fixed;
  std::vector<Case> race;                                      // empty: no "race" mode
  std::function<std::vector<Case>(unsigned, int)> random;      // empty: no "random" mode
};

template <class Case, class Run>
int main(int argc, char** argv, unsigned seed, const CaseLists<Case>& lists, Run&& run) {
  rng.seed(seed);
  const std::string mode = argc > 1 ? argv[1] : "fixed";
  std::vector<Case> cases;
  if (mode == "fixed" && argc <= 3) {
    cases = lists.fixed;
    if (argc == 3) cases.resize(std::min<size_t>(cases.size(), static_cast<size_t>(std::atoi(argv[2]))));
  } else if (mode == "race" && argc == 2 && !lists.race.empty()) {
    cases = lists.race;
  } else if (mode == "random" && argc == 4 && lists.random) {
    const auto random_seed = static_cast<unsigned>(std::atoi(argv[2]));
    rng.seed(random_seed);
    cases = lists.random(random_seed, std::atoi(argv[3]));
  } else {
    std::fprintf(stderr, "usage: %s fixed [COUNT]%s%s\n", argv[0], lists.race.empty() ? "" : " | race",
                 lists.random ? " | random SEED COUNT" : "");
    return 2;
  }
  for (const Case& c : cases) run(c);
  std::printf("fails: %d\n", failures);
  return failures != 0;
}

}  // namespace harness
