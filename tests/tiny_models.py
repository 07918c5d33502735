"""Tiny random transformers models, one per architecture family, built in code (no downloads)."""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Callable

import torch
import transformers as tf

warnings.filterwarnings("ignore")
tf.logging.set_verbosity_error()

VOCAB = 96
SEQ = 8


class ChatGLMStyleConfig(tf.PretrainedConfig):
    model_type = "chatglm"

    def __init__(self, vocab_size=VOCAB, hidden_size=32, num_layers=2, num_attention_heads=4, **kwargs):
        self.vocab_size, self.hidden_size = vocab_size, hidden_size
        self.num_layers, self.num_attention_heads = num_layers, num_attention_heads
        super().__init__(**kwargs)


class ChatGLMStyleBlock(torch.nn.Module):
    """A ChatGLM-shaped block: one fused query_key_value projection, pre-norm, GELU MLP."""

    def __init__(self, config: ChatGLMStyleConfig):
        super().__init__()
        h = config.hidden_size
        self.heads = config.num_attention_heads
        self.input_layernorm = torch.nn.LayerNorm(h)
        self.self_attention = torch.nn.Module()
        self.self_attention.query_key_value = torch.nn.Linear(h, 3 * h)
        self.self_attention.dense = torch.nn.Linear(h, h)
        self.post_attention_layernorm = torch.nn.LayerNorm(h)
        self.mlp = torch.nn.Module()
        self.mlp.dense_h_to_4h = torch.nn.Linear(h, 4 * h)
        self.mlp.dense_4h_to_h = torch.nn.Linear(4 * h, h)

    def forward(self, x, mask, past=None):
        B, T, H = x.shape
        q, k, v = self.self_attention.query_key_value(self.input_layernorm(x)).split(H, dim=-1)
        q, k, v = (t.view(B, T, self.heads, H // self.heads).transpose(1, 2) for t in (q, k, v))  # (B, heads, T, d)
        if past is not None:  # this layer's (keys, values) in front, (B, heads, P, d), as GLM-4's kv_cache
            k, v = torch.cat([past[0], k], dim=2), torch.cat([past[1], v], dim=2)  # (B, heads, P + T, d)
        att = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        x = x + self.self_attention.dense(att.transpose(1, 2).reshape(B, T, H))
        return x + self.mlp.dense_4h_to_h(torch.nn.functional.gelu(self.mlp.dense_h_to_4h(self.post_attention_layernorm(x))))


class ChatGLMStyleForCausalLM(tf.PreTrainedModel):
    """A tiny stand-in for ChatGLM (remote code, not in transformers): its module names and fused QKV."""

    config_class = ChatGLMStyleConfig

    def __init__(self, config: ChatGLMStyleConfig):
        super().__init__(config)
        self.transformer = torch.nn.Module()
        self.transformer.embedding = torch.nn.Module()
        self.transformer.embedding.word_embeddings = torch.nn.Embedding(config.vocab_size, config.hidden_size)
        self.transformer.encoder = torch.nn.Module()
        self.transformer.encoder.layers = torch.nn.ModuleList(ChatGLMStyleBlock(config) for _ in range(config.num_layers))
        self.transformer.output_layer = torch.nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self):
        return self.transformer.embedding.word_embeddings

    def forward(self, input_ids=None, attention_mask=None, inputs_embeds=None, labels=None, past_key_values=None, **kwargs):
        """past_key_values: per-layer (keys, values) that every position attends to first (ChatGLM's
        pre_seq_len prefixes reach its layers this way); attention_mask then covers them too."""
        x = self.transformer.embedding.word_embeddings(input_ids) if inputs_embeds is None else inputs_embeds
        T = x.shape[1]
        P = past_key_values[0][0].shape[2] if past_key_values else 0
        mask = torch.ones(T, P + T, dtype=torch.bool).tril(diagonal=P)  # (T, P + T) causal after the P in front
        if attention_mask is not None:
            mask = mask & attention_mask.bool()[:, None, None, :]  # (B, 1, T, P + T)
        for i, layer in enumerate(self.transformer.encoder.layers):
            x = layer(x, mask, past_key_values[i] if past_key_values else None)
        logits = self.transformer.output_layer(x)
        loss = None
        if labels is not None:
            loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1))
        return tf.modeling_outputs.CausalLMOutput(loss=loss, logits=logits)


@dataclass(frozen=True)
class Arch:
    name: str
    build: Callable[[], torch.nn.Module]
    kind: str  # "causal", "seq_cls", "seq2seq"
    has_bias: bool = True


def _causal(config_cls, model_cls, **kw):
    return lambda: model_cls(config_cls(vocab_size=VOCAB, **kw))


SMALL = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4)

ARCHS: dict[str, Arch] = {
    a.name: a
    for a in [
        Arch("llama", _causal(tf.LlamaConfig, tf.LlamaForCausalLM, num_key_value_heads=2, **SMALL), "causal", has_bias=False),
        Arch("mistral", _causal(tf.MistralConfig, tf.MistralForCausalLM, num_key_value_heads=2, **SMALL), "causal", has_bias=False),
        Arch("qwen2", _causal(tf.Qwen2Config, tf.Qwen2ForCausalLM, num_key_value_heads=2, **SMALL), "causal"),
        Arch("gpt2", _causal(tf.GPT2Config, tf.GPT2LMHeadModel, n_embd=32, n_layer=2, n_head=4, n_positions=64), "causal"),
        Arch("gpt_bigcode", _causal(tf.GPTBigCodeConfig, tf.GPTBigCodeForCausalLM, n_embd=32, n_layer=2, n_head=4, n_positions=64), "causal"),
        Arch("gpt_neox", _causal(tf.GPTNeoXConfig, tf.GPTNeoXForCausalLM, **SMALL), "causal"),
        Arch("opt", _causal(tf.OPTConfig, tf.OPTForCausalLM, hidden_size=32, ffn_dim=64, num_hidden_layers=2,
                            num_attention_heads=4, word_embed_proj_dim=32, max_position_embeddings=64), "causal"),
        Arch("bloom", _causal(tf.BloomConfig, tf.BloomForCausalLM, hidden_size=32, n_layer=2, n_head=4), "causal"),
        Arch("chatglm", lambda: ChatGLMStyleForCausalLM(ChatGLMStyleConfig()), "causal"),
        Arch("bert", _causal(tf.BertConfig, tf.BertForSequenceClassification, num_labels=3, **SMALL), "seq_cls"),
        Arch("roberta", _causal(tf.RobertaConfig, tf.RobertaForSequenceClassification, num_labels=3, pad_token_id=1, **SMALL), "seq_cls"),
        Arch("t5", _causal(tf.T5Config, tf.T5ForConditionalGeneration, d_model=32, d_kv=8, d_ff=64, num_layers=2,
                           num_heads=4, decoder_start_token_id=0), "seq2seq", has_bias=False),
        Arch("bart", _causal(tf.BartConfig, tf.BartForConditionalGeneration, d_model=32, encoder_layers=2, decoder_layers=2,
                             encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64,
                             max_position_embeddings=64, init_std=0.2), "seq2seq"),
    ]
}


def build(arch: str, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = ARCHS[arch].build()
    model.eval()  # dropout off: every comparison below is exact
    return model


def batch(arch: str, seed: int = 1) -> dict[str, torch.Tensor]:
    """A batch of two rows, the second padded at the end, with labels for the model's loss."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (2, SEQ), generator=g)
    mask = torch.ones(2, SEQ, dtype=torch.long)
    mask[1, -2:] = 0
    kind = ARCHS[arch].kind
    out = {"input_ids": ids, "attention_mask": mask}
    if kind == "causal":
        out["labels"] = ids.masked_fill(mask == 0, -100)
    elif kind == "seq_cls":
        out["labels"] = torch.tensor([0, 2])
    else:
        out["labels"] = torch.randint(3, VOCAB, (2, 5), generator=g)
    return out


def logits(model: torch.nn.Module, data: dict[str, torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        return model(**data).logits
