"""Config overrides for a seconds-long training run on the synthetic source, shared by the tests
that need a trained checkpoint or a trainer to poke at."""

SMALL_RUN = [
    "model.overrides={dim: 32, encoder_depth: 1, decoder_depth: 1, num_heads: 2}",
    "modalities=[{name: rgb, kind: image, vocab_size: 64, grid: 4}, {name: depth, kind: image, vocab_size: 32, grid: 4},"
    " {name: caption, kind: sequence, vocab_size: 60, max_length: 12}]",
    "data.num_input_tokens=12", "data.num_target_tokens=10", "data.num_sentinels=12",
    "train.batch_size=4", "log.tensorboard=false", "log.progress=false", "checkpoint.every=2",
]
