"""Plain-PyTorch statements of each op's semantics: the tests' oracle and the benchmarks' baselines."""
