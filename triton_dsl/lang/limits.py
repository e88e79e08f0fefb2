"""Every bound the language enforces, in one place (docs/language.md, "Limits", lists them).

They keep `triton-dsl check` answering within about a second for any file, and make sure that a
value which passes the checker is one the generated Python module can hold. Each is far above any
real network: ResNet-152 has about 500 layers, a 1-trillion-parameter model is under MAX_PARAMS.
"""

MAX_BYTES = 64 << 10  # a .tdsl file; a 200-layer network is ~10 KiB, larger ones use blocks and repeats
MAX_DEPTH = 32  # indentation levels or nested brackets
MAX_DIGITS = 30  # digits of an integer literal; longer ones are out of every range below
MAX_SIZE = 1 << 24  # any size: features, channels, input dimensions, kernels, strides, groups
MAX_LAYERS = 10_000  # layers of all models of a file, after blocks and repeats are expanded
MAX_PARAMS = 1 << 40  # parameters of all models of a file (about 1.1e12)
MAX_RULES = 128  # precision rules applying to one model
MAX_THRESHOLD = 1000.0  # fixed ternary thresholds, for weights and for activations
MAX_SEQ = 1 << 16  # max_len of token input: the rotary tables and KV cache are sized by it
