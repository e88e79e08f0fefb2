"""triton-dsl: declare quantized networks in .tdsl files and compile them to PyTorch modules."""
__version__ = "0.1.0"
