"""Builds a tiny random Llama and its tokenizer in DIR, offline: no download from any hub.

vLLM loads it like any Hugging Face checkpoint; its outputs are random tokens, which is all the
end-to-end tests need (real requests, real streams, real engine). head_dim is 32: vLLM's CPU
attention backend supports 32/64/80/96/112/128/…, not 16.
"""
import json
import os
import sys

from tokenizers import Tokenizer, models, pre_tokenizers, trainers, decoders
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast


def main(out):
    os.makedirs(out, exist_ok=True)
    corpus = [
        "the quick brown fox jumps over the lazy dog",
        "inferwatch times every request from the kernel",
        "hello world, this is a tiny model for tests",
        "tokens stream one by one to the client",
    ] * 50
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=512, special_tokens=["<unk>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(corpus, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    fast.chat_template = (
        "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}assistant: {% endif %}"
    )
    fast.save_pretrained(out)
    config = LlamaConfig(
        vocab_size=len(fast), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=2, head_dim=32, max_position_embeddings=1024,
        bos_token_id=fast.bos_token_id, eos_token_id=fast.eos_token_id, tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(config)
    model.save_pretrained(out, safe_serialization=True)
    with open(os.path.join(out, "inferwatch-tiny.json"), "w") as f:
        json.dump({"made_by": "tests/e2e/make_tiny_model.py"}, f)


if __name__ == "__main__":
    main(sys.argv[1])
