"""Small Hugging Face models built from configs with random weights: nothing is downloaded.

Factories for `triton-dsl plan RULES --model examples.hf_models:tiny_llama` (run from the
repository root) and for tests/test_hf_models.py. Needs the `hf` extra (transformers).
"""
import torch


def tiny_llama(hidden: int = 64, layers: int = 2, vocab: int = 256, seed: int = 0):
    """A Llama-style causal LM (RMSNorm, rotary attention with grouped KV heads, SwiGLU MLP)."""
    from transformers import LlamaConfig, LlamaForCausalLM
    config = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden,
                         num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=256, pad_token_id=0, bos_token_id=1,
                         eos_token_id=2, tie_word_embeddings=False)
    torch.manual_seed(seed)
    return LlamaForCausalLM(config).eval()


def wide_llama():
    """A width where weights dominate decoding (2048 hidden, 2 layers, a 32000-token
    vocabulary: 205M parameters, 0.8 GB in fp32): for `triton-dsl bench`."""
    return tiny_llama(hidden=2048, layers=2, vocab=32000)


def tiny_resnet(seed: int = 0):
    """A ResNet image classifier (basic blocks, batch norm) for 3x32x32 images, 10 classes."""
    from transformers import ResNetConfig, ResNetForImageClassification
    config = ResNetConfig(num_channels=3, embedding_size=16, hidden_sizes=[16, 32],
                          depths=[1, 1], layer_type="basic", num_labels=10)
    torch.manual_seed(seed)
    return ResNetForImageClassification(config).eval()
