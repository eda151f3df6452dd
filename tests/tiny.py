"""Tiny random models built from configs: every architecture the library is tested on, no downloads."""

from __future__ import annotations

import torch
import transformers as tf

from adaptkit.methods import METHODS

VOCAB = 96
SMALL = dict(vocab_size=VOCAB, pad_token_id=0, bos_token_id=1, eos_token_id=2)


def _seq2seq_common() -> dict:
    return dict(
        d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4, decoder_attention_heads=4,
        encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=64, decoder_start_token_id=2,
        **SMALL,
    )


BUILDERS = {
    "marian": lambda: tf.MarianMTModel(tf.MarianConfig(**_seq2seq_common())),
    "m2m100": lambda: tf.M2M100ForConditionalGeneration(tf.M2M100Config(**_seq2seq_common())),
    "mbart": lambda: tf.MBartForConditionalGeneration(tf.MBartConfig(**_seq2seq_common())),
    "bart": lambda: tf.BartForConditionalGeneration(tf.BartConfig(**_seq2seq_common())),
    "t5": lambda: tf.T5ForConditionalGeneration(
        tf.T5Config(d_model=32, d_kv=8, d_ff=64, num_layers=2, num_decoder_layers=2, num_heads=4,
                    decoder_start_token_id=0, **SMALL)
    ),
    "gpt2": lambda: tf.GPT2LMHeadModel(tf.GPT2Config(n_embd=32, n_layer=2, n_head=4, n_positions=64, **SMALL)),
    "llama": lambda: tf.LlamaForCausalLM(
        tf.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, max_position_embeddings=64, **SMALL)
    ),
    "gemma3": lambda: tf.Gemma3ForCausalLM(
        tf.Gemma3TextConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                            num_key_value_heads=1, head_dim=8, max_position_embeddings=64, sliding_window=4,
                            layer_types=["sliding_attention", "sliding_attention", "full_attention"], **SMALL)
    ),
    "bert": lambda: tf.BertForMaskedLM(
        tf.BertConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      max_position_embeddings=64, vocab_size=VOCAB, pad_token_id=0)
    ),
}
SEQ2SEQ = ["marian", "m2m100", "mbart", "bart", "t5"]
DECODERS = ["gpt2", "llama", "gemma3"]
ENCODERS = ["bert"]
ARCHS = SEQ2SEQ + DECODERS + ENCODERS


# Families whose adapters train from nothing; a fusion runs over trained members (tests/test_fusion.py trains one).
STANDALONE_METHODS = sorted(set(METHODS) - {"fusion"})


def tiny_model(arch: str, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = BUILDERS[arch]()
    model.eval()
    return model


def tiny_batch(arch: str, batch: int = 4, seq: int = 7, seed: int = 1) -> dict[str, torch.Tensor]:
    """Random ids with ragged padding, so masks matter."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (batch, seq), generator=g)
    mask = torch.ones(batch, seq, dtype=torch.long)
    for row in range(1, batch):
        mask[row, seq - row % 3:] = 0  # right padding of 0..2 tokens
    left_pad = arch in DECODERS
    if left_pad:
        mask = mask.flip(1)
    ids = ids.masked_fill(mask == 0, 0)
    out = {"input_ids": ids, "attention_mask": mask}
    if arch in SEQ2SEQ:
        out["decoder_input_ids"] = torch.randint(3, VOCAB, (batch, 5), generator=g)
    return out


def with_random_adapters(model, configs: dict, seed: int, scale: float):
    """Add each adapter of `configs` (name → config) to the AdaptedModel `model` with random weights:
    fresh adapters start as the identity (LoRA's B is zero), which would hide routing mistakes."""
    generator = torch.Generator().manual_seed(seed)
    for name, config in configs.items():
        model.add_adapter(name, config)
        with torch.no_grad():
            for parameter in model.adapter_parameters(name):
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * scale)
    return model


def random_lora_file(backbone, folder, name: str, seed: int, domain: str):
    """A LoRA for the saved backbone at `backbone`, random weights from `seed`, saved into `folder` with
    routing keys en→de and `domain`; returns its path."""
    import adaptkit as ak

    model = with_random_adapters(ak.load(backbone), {name: ak.LoRA(r=2, targets="attention")}, seed, 0.5)
    return model.save_adapter(name, folder / f"{name.replace('/', '_')}.safetensors", src_lang="en", tgt_lang="de",
                              domain=domain)


def saved_tiny_llama(folder):
    """The tiny llama and the decoder test tokenizer saved as a checkpoint in `folder` (what `ak.load` and
    `adaptkit serve --backbone` read); returns `folder`."""
    from test_train import tiny_tokenizer

    tiny_model("llama").save_pretrained(folder)
    tiny_tokenizer("decoder").save_pretrained(folder)
    return folder
