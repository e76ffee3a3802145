"""A catalog of tiny, fast-to-build transformers models for the architecture sweep (tests/test_architectures.py).

Every case builds a randomly initialised model from a config object (nothing is downloaded), with tiny sizes
(hidden 16-32, 1-2 layers, vocab <= 128, 16x16 / 32x32 images, a few hundred audio samples).

Each entry of ``CASES`` is a :class:`Case` with:

- ``name``: the transformers ``model_type`` (e.g. ``"bert"``); ``variant`` tells extra cases of one type apart
  (``key`` is ``name`` or ``name:variant`` and is unique);
- ``family``: encoder, encoder-decoder, decoder, decoder-moe, vision, audio, dual-encoder or multimodal;
- ``build()``: the model in eval mode, seeded (``torch.manual_seed(0)`` inside), float32 unless ``dtype`` is given;
- ``inputs(batch=2, seed=0)``: a dict of model inputs, drawn from a ``torch.Generator`` (deterministic);
- ``labels_inputs(batch=2, seed=0)``: the same plus labels (or ``return_loss=True``) so ``model(**x).loss`` exists,
  or ``None`` where the head takes no labels;
- ``reload_class``: the class to reload a ``save_pretrained`` folder with, an Auto class name where the Auto
  mapping gives back the same class (``auto_class`` is always the Auto class a user would reach for first);
- ``output_key``: the main output tensor (``"logits"``, CLIP's ``"logits_per_image"``...);
- ``tied``: True where the output embedding (lm_head / proj_out) is tied to the input one (measured on 5.24).

Usage::

    from architectures import CASES, by_key
    case = by_key("bert")
    model = case.build()
    out = model(**case.inputs())

``tests/test_architectures.py`` runs every promise of hf_vcon on these cases.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
import transformers

V = 99  # vocab size of every text model (<= 128)
S = 8  # text sequence length
NUM_LABELS = 3


# ----------------------------------------------------------------------------------------------- the case type
@dataclass
class Case:
    name: str
    family: str
    model_class: str
    make_config: Callable[[], object] = field(repr=False)
    make_inputs: Callable[[int, torch.Generator], dict] = field(repr=False)
    make_labels: Optional[Callable[[dict, int, torch.Generator], dict]] = field(default=None, repr=False)
    auto_class: str = "AutoModel"
    reload_class: Optional[str] = None  # defaults to auto_class
    output_key: str = "logits"
    variant: str = ""
    tied: bool = False
    notes: str = ""

    @property
    def key(self) -> str:
        return f"{self.name}:{self.variant}" if self.variant else self.name

    def __post_init__(self) -> None:
        if self.reload_class is None:
            self.reload_class = self.auto_class

    def config(self):
        return self.make_config()

    def build(self, dtype: Optional[torch.dtype] = None):
        """The model, seeded, in eval mode (float32 unless ``dtype``, e.g. ``torch.bfloat16``).

        With a dtype the model is built as ``from_pretrained(..., dtype=...)`` would build it (``_from_config``):
        parameters in that dtype, buffers such as RoPE's ``inv_freq`` kept in float32.
        """
        torch.manual_seed(0)
        cls = getattr(transformers, self.model_class)
        config = self.make_config()
        if dtype is None:
            return cls(config).eval()
        try:
            model = cls._from_config(config, dtype=dtype)  # transformers 5
        except TypeError:
            model = cls._from_config(config, torch_dtype=dtype)  # transformers 4
        return model.eval()

    def inputs(self, batch: int = 2, seed: int = 0) -> dict:
        return self.make_inputs(batch, torch.Generator().manual_seed(seed))

    @property
    def has_labels(self) -> bool:
        return self.make_labels is not None

    def labels_inputs(self, batch: int = 2, seed: int = 0) -> Optional[dict]:
        if self.make_labels is None:
            return None
        gen = torch.Generator().manual_seed(seed)
        x = self.make_inputs(batch, gen)
        return self.make_labels(x, batch, gen)


def cfg(name: str, **kwargs):
    """``transformers.<name>(**kwargs)``, resolved lazily."""
    return lambda: getattr(transformers, name)(**kwargs)


# ------------------------------------------------------------------------------------------- input makers
def _ids(batch, gen, length=S, low=4, high=V):
    return torch.randint(low, high, (batch, length), generator=gen)


def text_inputs(token_type_ids=False, length=S, high=V):
    def make(batch, gen):
        x = {"input_ids": _ids(batch, gen, length, high=high), "attention_mask": torch.ones(batch, length, dtype=torch.long)}
        if token_type_ids:
            x["token_type_ids"] = torch.zeros(batch, length, dtype=torch.long)
        return x

    return make


def seq2seq_inputs(length=S, tgt=6, high=V):
    def make(batch, gen):
        return {
            "input_ids": _ids(batch, gen, length, high=high),
            "attention_mask": torch.ones(batch, length, dtype=torch.long),
            "decoder_input_ids": _ids(batch, gen, tgt, high=high),
        }

    return make


def image_inputs(size=16, channels=3):
    return lambda batch, gen: {"pixel_values": torch.randn(batch, channels, size, size, generator=gen)}


def audio_inputs(samples=320):
    return lambda batch, gen: {"input_values": torch.randn(batch, samples, generator=gen)}


def class_labels(x, batch, gen, num=NUM_LABELS):
    return {**x, "labels": torch.randint(0, num, (batch,), generator=gen)}


def causal_labels(x, batch, gen):
    return {**x, "labels": x["input_ids"].clone()}


def seq2seq_labels(x, batch, gen):
    labels = x["decoder_input_ids"].clone()
    x = {k: v for k, v in x.items() if k != "decoder_input_ids"}
    return {**x, "labels": labels}


def ctc_labels(x, batch, gen, vocab=32, length=4):
    return {**x, "labels": torch.randint(1, vocab, (batch, length), generator=gen)}


def contrastive_labels(x, batch, gen):
    return {**x, "return_loss": True}


# ------------------------------------------------------------------------------------- shared config kwargs
BERT_LIKE = dict(vocab_size=V, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                 max_position_embeddings=64, num_labels=NUM_LABELS)
LLAMA_LIKE = dict(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0, bos_token_id=1, eos_token_id=2)
BART_LIKE = dict(vocab_size=V, d_model=32, encoder_layers=1, decoder_layers=1, encoder_attention_heads=4,
                 decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=64)
T5_LIKE = dict(vocab_size=V, d_model=32, d_kv=8, d_ff=64, num_layers=1, num_decoder_layers=1, num_heads=4,
               relative_attention_num_buckets=8, relative_attention_max_distance=16, decoder_start_token_id=0)
VIT_LIKE = dict(image_size=16, patch_size=4, num_channels=3, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                intermediate_size=64, num_labels=NUM_LABELS)
W2V_LIKE = dict(vocab_size=32, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                conv_dim=(16, 16), conv_stride=(5, 2), conv_kernel=(10, 3), num_conv_pos_embeddings=16,
                num_conv_pos_embedding_groups=2, mask_time_prob=0.0, pad_token_id=0)
CLIP_TEXT = dict(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                 max_position_embeddings=16)
CLIP_VISION = dict(image_size=16, patch_size=4, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                   num_attention_heads=4)

CASES: list[Case] = []


def add(*args, **kwargs) -> Case:
    case = Case(*args, **kwargs)
    CASES.append(case)
    return case


SEQ_CLS = "AutoModelForSequenceClassification"
CAUSAL = "AutoModelForCausalLM"
S2S = "AutoModelForSeq2SeqLM"
IMG = "AutoModelForImageClassification"
CTC = "AutoModelForCTC"

# ------------------------------------------------------------------------------------------------ encoders
add("bert", "encoder", "BertForSequenceClassification", cfg("BertConfig", **BERT_LIKE),
    text_inputs(token_type_ids=True), class_labels, SEQ_CLS)
add("roberta", "encoder", "RobertaForSequenceClassification", cfg("RobertaConfig", **BERT_LIKE),
    text_inputs(), class_labels, SEQ_CLS, notes="classifier is RobertaClassificationHead(dense, out_proj)")
add("xlm-roberta", "encoder", "XLMRobertaForSequenceClassification", cfg("XLMRobertaConfig", **BERT_LIKE),
    text_inputs(), class_labels, SEQ_CLS)
add("camembert", "encoder", "CamembertForSequenceClassification", cfg("CamembertConfig", **BERT_LIKE),
    text_inputs(), class_labels, SEQ_CLS)
add("data2vec-text", "encoder", "Data2VecTextForSequenceClassification", cfg("Data2VecTextConfig", **BERT_LIKE),
    text_inputs(), class_labels, SEQ_CLS)
add("electra", "encoder", "ElectraForSequenceClassification", cfg("ElectraConfig", **BERT_LIKE, embedding_size=16),
    text_inputs(), class_labels, SEQ_CLS, notes="embedding_size 16 != hidden: embeddings_project Linear(16, 32)")
add("deberta", "encoder", "DebertaForSequenceClassification",
    cfg("DebertaConfig", **BERT_LIKE, relative_attention=True, pos_att_type=["c2p", "p2c"], max_relative_positions=16),
    text_inputs(), class_labels, SEQ_CLS)
add("deberta-v2", "encoder", "DebertaV2ForSequenceClassification",
    cfg("DebertaV2Config", **BERT_LIKE, relative_attention=True, pos_att_type=["p2c", "c2p"], position_buckets=16,
        max_relative_positions=16, norm_rel_ebd="layer_norm", share_att_key=True),
    text_inputs(), class_labels, SEQ_CLS)
add("distilbert", "encoder", "DistilBertForSequenceClassification",
    cfg("DistilBertConfig", vocab_size=V, dim=32, n_layers=2, n_heads=4, hidden_dim=64, max_position_embeddings=64,
        num_labels=NUM_LABELS),
    text_inputs(), class_labels, SEQ_CLS, notes="pre_classifier Linear(32, 32) before classifier")
add("albert", "encoder", "AlbertForSequenceClassification", cfg("AlbertConfig", **BERT_LIKE, embedding_size=16),
    text_inputs(), class_labels, SEQ_CLS, notes="one shared layer group; embedding_hidden_mapping_in Linear(16, 32)")
add("mpnet", "encoder", "MPNetForSequenceClassification", cfg("MPNetConfig", **BERT_LIKE),
    text_inputs(), class_labels, SEQ_CLS, notes="classifier is MPNetClassificationHead(dense, out_proj)")
add("modernbert", "encoder", "ModernBertForSequenceClassification",
    cfg("ModernBertConfig", vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=64, global_attn_every_n_layers=2, local_attention=8, pad_token_id=0, bos_token_id=1,
        eos_token_id=2, cls_token_id=1, sep_token_id=2, num_labels=NUM_LABELS),
    text_inputs(), class_labels, SEQ_CLS, notes="fused Wqkv, fused GLU Wi; head.dense + classifier")
add("ernie", "encoder", "ErnieForSequenceClassification", cfg("ErnieConfig", **BERT_LIKE),
    text_inputs(token_type_ids=True), class_labels, SEQ_CLS)
add("megatron-bert", "encoder", "MegatronBertForSequenceClassification", cfg("MegatronBertConfig", **BERT_LIKE),
    text_inputs(token_type_ids=True), class_labels, SEQ_CLS)
add("roformer", "encoder", "RoFormerForSequenceClassification", cfg("RoFormerConfig", **BERT_LIKE),
    text_inputs(), class_labels, SEQ_CLS)
add("convbert", "encoder", "ConvBertForSequenceClassification",
    cfg("ConvBertConfig", **BERT_LIKE, embedding_size=32, head_ratio=2, conv_kernel_size=3),
    text_inputs(), class_labels, SEQ_CLS)
add("funnel", "encoder", "FunnelForSequenceClassification",
    cfg("FunnelConfig", vocab_size=V, block_sizes=[1, 1], num_decoder_layers=1, d_model=32, n_head=4, d_head=8,
        d_inner=64, max_position_embeddings=64, num_labels=NUM_LABELS),
    text_inputs(), class_labels, SEQ_CLS, notes="classifier is FunnelClassificationHead(linear_hidden, linear_out)")
add("squeezebert", "encoder", "SqueezeBertForSequenceClassification",
    cfg("SqueezeBertConfig", **BERT_LIKE, embedding_size=32, q_groups=2, k_groups=2, v_groups=2, post_attention_groups=2,
        intermediate_groups=2, output_groups=2),
    text_inputs(), class_labels, SEQ_CLS, notes="attention/FFN are nn.Conv1d: only pooler.dense is Linear besides the head")
add("mobilebert", "encoder", "MobileBertForSequenceClassification",
    cfg("MobileBertConfig", vocab_size=V, hidden_size=32, embedding_size=16, intra_bottleneck_size=16,
        true_hidden_size=16, num_hidden_layers=2, num_attention_heads=4, intermediate_size=32,
        num_feedforward_networks=1, max_position_embeddings=64, num_labels=NUM_LABELS),
    text_inputs(), class_labels, SEQ_CLS, notes="trigram embedding_transformation Linear(48, 32); NoNorm")
add("longformer", "encoder", "LongformerForSequenceClassification",
    cfg("LongformerConfig", **BERT_LIKE, attention_window=4),
    text_inputs(), class_labels, SEQ_CLS, notes="query_global/key_global/value_global Linears; classifier.out_proj")
add("big_bird", "encoder", "BigBirdForSequenceClassification",
    cfg("BigBirdConfig", **BERT_LIKE, attention_type="original_full"),
    text_inputs(), class_labels, SEQ_CLS)
add("nystromformer", "encoder", "NystromformerForSequenceClassification",
    cfg("NystromformerConfig", **BERT_LIKE, num_landmarks=4, segment_means_seq_len=S, conv_kernel_size=3),
    text_inputs(), class_labels, SEQ_CLS)
add("xlm", "encoder", "XLMForSequenceClassification",
    cfg("XLMConfig", vocab_size=V, emb_dim=32, n_layers=2, n_heads=4, max_position_embeddings=64, num_labels=NUM_LABELS),
    text_inputs(), class_labels, SEQ_CLS, notes="head is sequence_summary.summary (SequenceSummary)")
add("xlnet", "encoder", "XLNetForSequenceClassification",
    cfg("XLNetConfig", vocab_size=V, d_model=32, n_layer=2, n_head=4, d_inner=64, num_labels=NUM_LABELS),
    text_inputs(), class_labels, SEQ_CLS,
    notes="attention q/k/v/o/r are raw nn.Parameters, not Linear; head is sequence_summary.summary + logits_proj")

# ---------------------------------------------------------------------------------------- encoder-decoders
add("t5", "encoder-decoder", "T5ForConditionalGeneration", cfg("T5Config", **T5_LIKE),
    seq2seq_inputs(), seq2seq_labels, S2S, tied=True, notes="tie_word_embeddings=True: lm_head tied to shared")
add("mt5", "encoder-decoder", "MT5ForConditionalGeneration", cfg("MT5Config", **T5_LIKE),
    seq2seq_inputs(), seq2seq_labels, S2S, tied=True,
    notes="lm_head tied to shared in transformers 5; not in 4.57 (MT5Config tie_word_embeddings default False there)")
add("umt5", "encoder-decoder", "UMT5ForConditionalGeneration", cfg("UMT5Config", **T5_LIKE),
    seq2seq_inputs(), seq2seq_labels, S2S, tied=True)
add("longt5", "encoder-decoder", "LongT5ForConditionalGeneration",
    cfg("LongT5Config", **T5_LIKE, encoder_attention_type="local", local_radius=2),
    seq2seq_inputs(), seq2seq_labels, S2S, tied=True)
add("switch_transformers", "encoder-decoder", "SwitchTransformersForConditionalGeneration",
    cfg("SwitchTransformersConfig", **T5_LIKE, num_experts=4, expert_capacity=16, num_sparse_encoder_layers=1,
        num_sparse_decoder_layers=1, router_jitter_noise=0.0),
    seq2seq_inputs(), seq2seq_labels, S2S, tied=True,
    notes="MoE as a ModuleDict of per-expert DenseActDense Linears; router.classifier Linear(32, 4)")
add("bart", "encoder-decoder", "BartForConditionalGeneration", cfg("BartConfig", **BART_LIKE),
    seq2seq_inputs(), seq2seq_labels, S2S, tied=True)
add("mbart", "encoder-decoder", "MBartForConditionalGeneration", cfg("MBartConfig", **BART_LIKE),
    seq2seq_inputs(), seq2seq_labels, S2S, tied=True)
add("pegasus", "encoder-decoder", "PegasusForConditionalGeneration", cfg("PegasusConfig", **BART_LIKE),
    seq2seq_inputs(), seq2seq_labels, S2S, tied=True)
add("marian", "encoder-decoder", "MarianMTModel",
    cfg("MarianConfig", **BART_LIKE, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0),
    seq2seq_inputs(), seq2seq_labels, S2S, tied=True)
add("blenderbot", "encoder-decoder", "BlenderbotForConditionalGeneration", cfg("BlenderbotConfig", **BART_LIKE),
    seq2seq_inputs(), seq2seq_labels, S2S, tied=True)
add("m2m_100", "encoder-decoder", "M2M100ForConditionalGeneration", cfg("M2M100Config", **BART_LIKE),
    seq2seq_inputs(), seq2seq_labels, S2S, tied=True)
add("led", "encoder-decoder", "LEDForConditionalGeneration",
    cfg("LEDConfig", vocab_size=V, d_model=32, encoder_layers=1, decoder_layers=1, encoder_attention_heads=4,
        decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64, max_encoder_position_embeddings=64,
        max_decoder_position_embeddings=64, attention_window=4),
    seq2seq_inputs(), seq2seq_labels, S2S, tied=True)
add("prophetnet", "encoder-decoder", "ProphetNetForConditionalGeneration",
    cfg("ProphetNetConfig", vocab_size=V, hidden_size=32, encoder_ffn_dim=64, decoder_ffn_dim=64, num_encoder_layers=1,
        num_decoder_layers=1, num_encoder_attention_heads=4, num_decoder_attention_heads=4, ngram=2, num_buckets=8,
        relative_max_distance=16, max_position_embeddings=64),
    seq2seq_inputs(), seq2seq_labels, S2S, tied=True)
add("bart", "encoder-decoder", "BartForSequenceClassification",
    cfg("BartConfig", **BART_LIKE, num_labels=NUM_LABELS),
    # BartForSequenceClassification pools at the last <eos> (id 2) and needs the same count in every row.
    lambda batch, gen: {"input_ids": torch.cat([_ids(batch, gen, S - 1), torch.full((batch, 1), 2)], 1),
                        "attention_mask": torch.ones(batch, S, dtype=torch.long)},
    class_labels, SEQ_CLS, variant="seqcls",
    notes="classification_head is BartClassificationHead(dense, out_proj)")

# --------------------------------------------------------------------------------------------- decoders
add("gpt2", "decoder", "GPT2LMHeadModel",
    cfg("GPT2Config", vocab_size=V, n_embd=32, n_layer=2, n_head=4, n_positions=64),
    text_inputs(), causal_labels, CAUSAL, tied=True, notes="Conv1D layers (c_attn fused qkv); lm_head tied to wte")
add("gpt_neox", "decoder", "GPTNeoXForCausalLM",
    cfg("GPTNeoXConfig", vocab_size=V, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=64, max_position_embeddings=64, rotary_pct=0.25),
    text_inputs(), causal_labels, CAUSAL, notes="fused query_key_value; head is embed_out")
add("gptj", "decoder", "GPTJForCausalLM",
    cfg("GPTJConfig", vocab_size=V, n_embd=32, n_layer=2, n_head=4, rotary_dim=4, n_positions=64),
    text_inputs(), causal_labels, CAUSAL)
add("llama", "decoder", "LlamaForCausalLM", cfg("LlamaConfig", **LLAMA_LIKE),
    text_inputs(), causal_labels, CAUSAL, notes="GQA (4 q heads, 2 kv heads)")
add("llama", "decoder", "LlamaForCausalLM", cfg("LlamaConfig", **LLAMA_LIKE, tie_word_embeddings=True),
    text_inputs(), causal_labels, CAUSAL, variant="tied", tied=True, notes="tie_word_embeddings=True")
add("llama", "decoder", "LlamaForSequenceClassification", cfg("LlamaConfig", **LLAMA_LIKE, num_labels=NUM_LABELS),
    text_inputs(), class_labels, SEQ_CLS, variant="seqcls", notes="head is top-level score")
add("mistral", "decoder", "MistralForCausalLM", cfg("MistralConfig", **LLAMA_LIKE, sliding_window=4),
    text_inputs(), causal_labels, CAUSAL)
add("qwen2", "decoder", "Qwen2ForCausalLM", cfg("Qwen2Config", **LLAMA_LIKE),
    text_inputs(), causal_labels, CAUSAL)
add("qwen3", "decoder", "Qwen3ForCausalLM", cfg("Qwen3Config", **LLAMA_LIKE, head_dim=8),
    text_inputs(), causal_labels, CAUSAL)
add("phi", "decoder", "PhiForCausalLM",
    cfg("PhiConfig", vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=64, partial_rotary_factor=0.5),
    text_inputs(), causal_labels, CAUSAL)
add("phi3", "decoder", "Phi3ForCausalLM", cfg("Phi3Config", **LLAMA_LIKE),
    text_inputs(), causal_labels, CAUSAL, notes="fused qkv_proj and gate_up_proj")
add("gemma", "decoder", "GemmaForCausalLM", cfg("GemmaConfig", **LLAMA_LIKE, head_dim=8),
    text_inputs(), causal_labels, CAUSAL, tied=True, notes="tie_word_embeddings=True by default")
add("gemma2", "decoder", "Gemma2ForCausalLM",
    cfg("Gemma2Config", **LLAMA_LIKE, head_dim=8, query_pre_attn_scalar=8, sliding_window=4),
    text_inputs(), causal_labels, CAUSAL, tied=True)
add("gemma3_text", "decoder", "Gemma3ForCausalLM",
    cfg("Gemma3TextConfig", **LLAMA_LIKE, head_dim=8, query_pre_attn_scalar=8, sliding_window=4),
    text_inputs(), causal_labels, CAUSAL, tied=True)
add("falcon", "decoder", "FalconForCausalLM",
    cfg("FalconConfig", vocab_size=V, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=64, bos_token_id=1, eos_token_id=2),
    text_inputs(), causal_labels, CAUSAL, tied=True, notes="multi-query; fused query_key_value")
add("bloom", "decoder", "BloomForCausalLM",
    cfg("BloomConfig", vocab_size=V, hidden_size=32, n_layer=2, n_head=4, bos_token_id=1, eos_token_id=2),
    text_inputs(), causal_labels, CAUSAL, tied=True, notes="ALiBi; fused query_key_value")
add("opt", "decoder", "OPTForCausalLM",
    cfg("OPTConfig", vocab_size=V, hidden_size=32, ffn_dim=64, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=64, word_embed_proj_dim=16),
    text_inputs(), causal_labels, CAUSAL, tied=True, notes="word_embed_proj_dim=16: project_in/project_out Linears")
add("olmo", "decoder", "OlmoForCausalLM", cfg("OlmoConfig", **LLAMA_LIKE),
    text_inputs(), causal_labels, CAUSAL)
add("olmo2", "decoder", "Olmo2ForCausalLM", cfg("Olmo2Config", **LLAMA_LIKE),
    text_inputs(), causal_labels, CAUSAL)
add("starcoder2", "decoder", "Starcoder2ForCausalLM", cfg("Starcoder2Config", **LLAMA_LIKE, sliding_window=4),
    text_inputs(), causal_labels, CAUSAL, tied=True)
add("stablelm", "decoder", "StableLmForCausalLM", cfg("StableLmConfig", **LLAMA_LIKE),
    text_inputs(), causal_labels, CAUSAL)
add("granite", "decoder", "GraniteForCausalLM", cfg("GraniteConfig", **LLAMA_LIKE),
    text_inputs(), causal_labels, CAUSAL)
add("cohere", "decoder", "CohereForCausalLM", cfg("CohereConfig", **LLAMA_LIKE),
    text_inputs(), causal_labels, CAUSAL, tied=True)
add("gpt_bigcode", "decoder", "GPTBigCodeForCausalLM",
    cfg("GPTBigCodeConfig", vocab_size=V, n_embd=32, n_layer=2, n_head=4, n_positions=64, multi_query=True),
    text_inputs(), causal_labels, CAUSAL, tied=True, notes="MQA fused c_attn as nn.Linear")
add("codegen", "decoder", "CodeGenForCausalLM",
    cfg("CodeGenConfig", vocab_size=V, n_embd=32, n_layer=2, n_head=4, rotary_dim=4, n_ctx=64, n_positions=64),
    text_inputs(), causal_labels, CAUSAL, notes="fused qkv_proj")
add("mpt", "decoder", "MptForCausalLM",
    cfg("MptConfig", vocab_size=V, d_model=32, n_heads=4, n_layers=2, expansion_ratio=2, max_seq_len=64),
    text_inputs(), causal_labels, CAUSAL, tied=True)

# ----------------------------------------------------------------------------------------------- MoE decoders
add("mixtral", "decoder-moe", "MixtralForCausalLM",
    cfg("MixtralConfig", **LLAMA_LIKE, num_local_experts=4, num_experts_per_tok=2),
    text_inputs(), causal_labels, CAUSAL)
add("qwen2_moe", "decoder-moe", "Qwen2MoeForCausalLM",
    cfg("Qwen2MoeConfig", **LLAMA_LIKE, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
        shared_expert_intermediate_size=32, decoder_sparse_step=1),
    text_inputs(), causal_labels, CAUSAL, notes="shared_expert_gate is Linear(32, 1)")
add("qwen3_moe", "decoder-moe", "Qwen3MoeForCausalLM",
    cfg("Qwen3MoeConfig", **LLAMA_LIKE, head_dim=8, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
        decoder_sparse_step=1),
    text_inputs(), causal_labels, CAUSAL)
add("deepseek_v3", "decoder-moe", "DeepseekV3ForCausalLM",
    cfg("DeepseekV3Config", **{**LLAMA_LIKE, "num_key_value_heads": 4}, n_routed_experts=4, num_experts_per_tok=2, n_shared_experts=1,
        moe_intermediate_size=32, first_k_dense_replace=1, kv_lora_rank=16, q_lora_rank=16, qk_nope_head_dim=8,
        qk_rope_head_dim=8, v_head_dim=8, n_group=1, topk_group=1),
    text_inputs(), causal_labels, CAUSAL, notes="MLA (q_a_proj/q_b_proj/kv_a_proj_with_mqa/kv_b_proj)")
add("deepseek_v2", "decoder-moe", "DeepseekV2ForCausalLM",
    cfg("DeepseekV2Config", **{**LLAMA_LIKE, "num_key_value_heads": 4}, n_routed_experts=4, num_experts_per_tok=2, n_shared_experts=1,
        moe_intermediate_size=32, first_k_dense_replace=1, kv_lora_rank=16, q_lora_rank=16, qk_nope_head_dim=8,
        qk_rope_head_dim=8, v_head_dim=8, n_group=1, topk_group=1),
    text_inputs(), causal_labels, CAUSAL)
add("olmoe", "decoder-moe", "OlmoeForCausalLM",
    cfg("OlmoeConfig", **LLAMA_LIKE, num_experts=4, num_experts_per_tok=2),
    text_inputs(), causal_labels, CAUSAL)
add("granitemoe", "decoder-moe", "GraniteMoeForCausalLM",
    cfg("GraniteMoeConfig", **LLAMA_LIKE, num_local_experts=4, num_experts_per_tok=2),
    text_inputs(), causal_labels, CAUSAL)
add("gpt_oss", "decoder-moe", "GptOssForCausalLM",
    cfg("GptOssConfig", **LLAMA_LIKE, head_dim=8, num_local_experts=4, num_experts_per_tok=2, sliding_window=4),
    text_inputs(), causal_labels, CAUSAL, notes="expert biases are 2-D (gate_up_proj_bias)")

# ------------------------------------------------------------------------------------------------- vision
add("vit", "vision", "ViTForImageClassification", cfg("ViTConfig", **VIT_LIKE),
    image_inputs(), class_labels, IMG)
add("deit", "vision", "DeiTForImageClassificationWithTeacher", cfg("DeiTConfig", **VIT_LIKE),
    image_inputs(), None, IMG,
    notes="heads cls_classifier + distillation_classifier; takes no labels (inference-only head); "
          "transformers 5's AutoModelForImageClassification maps deit to (DeiTForImageClassification, "
          "DeiTForImageClassificationWithTeacher) and picks by config.architectures")
add("deit", "vision", "DeiTForImageClassification", cfg("DeiTConfig", **VIT_LIKE),
    image_inputs(), class_labels, IMG, variant="cls")
add("beit", "vision", "BeitForImageClassification",
    cfg("BeitConfig", **VIT_LIKE, use_relative_position_bias=True, use_mean_pooling=True),
    image_inputs(), class_labels, IMG)
add("data2vec-vision", "vision", "Data2VecVisionForImageClassification",
    cfg("Data2VecVisionConfig", **VIT_LIKE, use_relative_position_bias=True),
    image_inputs(), class_labels, IMG)
add("dinov2", "vision", "Dinov2ForImageClassification", cfg("Dinov2Config", **VIT_LIKE),
    image_inputs(), class_labels, IMG, notes="classifier Linear(2*hidden, labels)")
add("swin", "vision", "SwinForImageClassification",
    cfg("SwinConfig", image_size=16, patch_size=2, embed_dim=16, depths=[1, 1], num_heads=[2, 4], window_size=2,
        num_labels=NUM_LABELS),
    image_inputs(), class_labels, IMG, notes="PatchMerging reduction Linear(64, 32)")
add("swinv2", "vision", "Swinv2ForImageClassification",
    cfg("Swinv2Config", image_size=16, patch_size=2, embed_dim=16, depths=[1, 1], num_heads=[2, 4], window_size=2,
        num_labels=NUM_LABELS),
    image_inputs(), class_labels, IMG, notes="continuous position bias cpb_mlp = Linear(2, 512), ReLU, Linear(512, heads)")
add("convnext", "vision", "ConvNextForImageClassification",
    cfg("ConvNextConfig", num_stages=2, hidden_sizes=[16, 32], depths=[1, 1], num_labels=NUM_LABELS),
    image_inputs(32), class_labels, IMG, notes="pwconv1/pwconv2 Linears in each block")
add("convnextv2", "vision", "ConvNextV2ForImageClassification",
    cfg("ConvNextV2Config", num_stages=2, hidden_sizes=[16, 32], depths=[1, 1], num_labels=NUM_LABELS),
    image_inputs(32), class_labels, IMG)
add("levit", "vision", "LevitForImageClassificationWithTeacher",
    cfg("LevitConfig", image_size=64, hidden_sizes=[16, 24, 32], num_attention_heads=[1, 1, 2], depths=[1, 1, 1],
        key_dim=[8, 8, 8], drop_path_rate=0, mlp_ratio=[2, 2, 2], attention_ratio=[2, 2, 2], num_labels=NUM_LABELS),
    image_inputs(64), None, IMG,
    notes="Linear+BatchNorm1d (MLPLayerWithBN); heads classifier.linear + classifier_distill.linear")
add("mobilevit", "vision", "MobileViTForImageClassification",
    cfg("MobileViTConfig", image_size=32, patch_size=2, hidden_sizes=[16, 16, 16], neck_hidden_sizes=[8, 8, 16, 16, 16, 32, 64],
        num_attention_heads=2, mlp_ratio=2.0, num_labels=NUM_LABELS),
    image_inputs(32), class_labels, IMG)
add("siglip_vision_model", "vision", "SiglipForImageClassification",
    cfg("SiglipConfig", text_config=dict(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                         num_attention_heads=4, max_position_embeddings=16),
        vision_config=CLIP_VISION, num_labels=NUM_LABELS),
    image_inputs(), class_labels, IMG,
    notes="SiglipForImageClassification keeps only the vision tower; its pooling head (MultiheadAttention) is "
          "not used (vision_use_head=False)")
add("segformer", "vision", "SegformerForImageClassification",
    cfg("SegformerConfig", num_encoder_blocks=2, depths=[1, 1], sr_ratios=[2, 1], hidden_sizes=[16, 32],
        patch_sizes=[7, 3], strides=[4, 2], num_attention_heads=[1, 2], mlp_ratios=[2, 2], decoder_hidden_size=32,
        num_labels=NUM_LABELS),
    image_inputs(32), class_labels, IMG)
add("resnet", "vision", "ResNetForImageClassification",
    cfg("ResNetConfig", embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], num_labels=NUM_LABELS),
    image_inputs(32), class_labels, IMG, notes="no nn.Linear besides the classifier: 'all-linear' matches nothing")

# -------------------------------------------------------------------------------------------------- audio
add("wav2vec2", "audio", "Wav2Vec2ForCTC", cfg("Wav2Vec2Config", **W2V_LIKE),
    audio_inputs(), ctc_labels, CTC, notes="head lm_head Linear(32, 32); feature_projection.projection Linear(16, 32)")
add("wav2vec2", "audio", "Wav2Vec2ForSequenceClassification", cfg("Wav2Vec2Config", **W2V_LIKE, num_labels=NUM_LABELS),
    audio_inputs(), class_labels, "AutoModelForAudioClassification", variant="seqcls",
    notes="projector Linear(32, 256) + classifier Linear(256, labels)")
add("hubert", "audio", "HubertForCTC", cfg("HubertConfig", **W2V_LIKE), audio_inputs(), ctc_labels, CTC)
add("wavlm", "audio", "WavLMForCTC", cfg("WavLMConfig", **W2V_LIKE, num_buckets=16, max_bucket_distance=32),
    audio_inputs(), ctc_labels, CTC, notes="gru_rel_pos_linear Linear(head_dim=8, 8)")
add("data2vec-audio", "audio", "Data2VecAudioForCTC",
    cfg("Data2VecAudioConfig", **{**W2V_LIKE, "num_conv_pos_embeddings": 3, "num_conv_pos_embedding_groups": 2},
        conv_pos_kernel_size=3, num_conv_pos_embeddings_layers=1),
    audio_inputs(), ctc_labels, CTC)
add("sew", "audio", "SEWForCTC", cfg("SEWConfig", **W2V_LIKE, squeeze_factor=2), audio_inputs(), ctc_labels, CTC)
add("unispeech", "audio", "UniSpeechForCTC", cfg("UniSpeechConfig", **W2V_LIKE, num_codevectors_per_group=8,
                                                  codevector_dim=16, proj_codevector_dim=16),
    audio_inputs(), ctc_labels, CTC)
add("wav2vec2-conformer", "audio", "Wav2Vec2ConformerForCTC",
    cfg("Wav2Vec2ConformerConfig", **W2V_LIKE, conv_depthwise_kernel_size=3, position_embeddings_type="rotary"),
    audio_inputs(), ctc_labels, CTC)
add("whisper", "audio", "WhisperForConditionalGeneration",
    cfg("WhisperConfig", vocab_size=V, num_mel_bins=16, encoder_layers=1, decoder_layers=1, encoder_attention_heads=4,
        decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64, d_model=32, max_source_positions=16,
        max_target_positions=32, pad_token_id=0, bos_token_id=1, eos_token_id=2, decoder_start_token_id=1,
        suppress_tokens=None, begin_suppress_tokens=None),
    lambda batch, gen: {"input_features": torch.randn(batch, 16, 32, generator=gen),
                        "decoder_input_ids": _ids(batch, gen, 6)},
    seq2seq_labels, "AutoModelForSpeechSeq2Seq", tied=True, notes="proj_out tied to decoder.embed_tokens")
add("speech_to_text", "audio", "Speech2TextForConditionalGeneration",
    cfg("Speech2TextConfig", vocab_size=V, d_model=32, encoder_layers=1, decoder_layers=1, encoder_attention_heads=4,
        decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64, max_source_positions=64,
        max_target_positions=32, input_feat_per_channel=16, num_conv_layers=2, conv_channels=32, conv_kernel_sizes=[5, 5]),
    lambda batch, gen: {"input_features": torch.randn(batch, 32, 16, generator=gen),
                        "attention_mask": torch.ones(batch, 32, dtype=torch.long),
                        "decoder_input_ids": _ids(batch, gen, 6)},
    seq2seq_labels, "AutoModelForSpeechSeq2Seq", tied=True)
add("audio-spectrogram-transformer", "audio", "ASTForAudioClassification",
    cfg("ASTConfig", hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, patch_size=4,
        frequency_stride=4, time_stride=4, max_length=32, num_mel_bins=16, num_labels=NUM_LABELS),
    lambda batch, gen: {"input_values": torch.randn(batch, 32, 16, generator=gen)},
    class_labels, "AutoModelForAudioClassification", notes="head is classifier.dense under ASTMLPHead")

# ------------------------------------------------------------------------------------------- dual encoders
def clip_inputs(batch, gen):
    return {"input_ids": _ids(batch, gen, S), "attention_mask": torch.ones(batch, S, dtype=torch.long),
            "pixel_values": torch.randn(batch, 3, 16, 16, generator=gen)}


add("clip", "dual-encoder", "CLIPModel",
    cfg("CLIPConfig", text_config=CLIP_TEXT, vision_config=CLIP_VISION, projection_dim=16),
    clip_inputs, contrastive_labels, "AutoModel", output_key="logits_per_image",
    notes="visual_projection / text_projection Linears (no bias)")
add("siglip", "dual-encoder", "SiglipModel",
    cfg("SiglipConfig", text_config=CLIP_TEXT, vision_config=CLIP_VISION),
    lambda batch, gen: {"input_ids": _ids(batch, gen, 16), "pixel_values": torch.randn(batch, 3, 16, 16, generator=gen)},
    contrastive_labels, "AutoModel", output_key="logits_per_image",
    notes="vision_model.head is SiglipMultiheadAttentionPoolingHead with nn.MultiheadAttention; text_model.head Linear")
add("chinese_clip", "dual-encoder", "ChineseCLIPModel",
    cfg("ChineseCLIPConfig", text_config=dict(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                              num_attention_heads=4, max_position_embeddings=64),
        vision_config=CLIP_VISION, projection_dim=16),
    lambda batch, gen: {**clip_inputs(batch, gen), "token_type_ids": torch.zeros(batch, S, dtype=torch.long)},
    contrastive_labels, "AutoModel", output_key="logits_per_image")

# ---------------------------------------------------------------------------------------------- multimodal
def _llava_config():
    return transformers.LlavaConfig(
        vision_config=transformers.CLIPVisionConfig(**CLIP_VISION),
        text_config=transformers.LlamaConfig(**{**LLAMA_LIKE, "vocab_size": 128}),
        image_token_index=100, projector_hidden_act="gelu", vision_feature_select_strategy="default",
        vision_feature_layer=-1, image_seq_length=16)


def _llava_inputs(batch, gen):
    text = _ids(batch, gen, 4)
    ids = torch.cat([torch.full((batch, 16), 100), text], 1)  # 16 image tokens (4x4 patches, CLS dropped)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids),
            "pixel_values": torch.randn(batch, 3, 16, 16, generator=gen)}


add("llava", "multimodal", "LlavaForConditionalGeneration", _llava_config, _llava_inputs, causal_labels,
    "AutoModelForImageTextToText", notes="CLIP vision tower + multi_modal_projector (linear_1, linear_2) + Llama")


def _paligemma_config():
    return transformers.PaliGemmaConfig(
        vision_config=transformers.SiglipVisionConfig(**CLIP_VISION, projection_dim=32),
        text_config=transformers.GemmaConfig(**{**LLAMA_LIKE, "vocab_size": 128}, head_dim=8),
        image_token_index=100, projection_dim=32, hidden_size=32)


def _paligemma_inputs(batch, gen):
    text = _ids(batch, gen, 4)
    ids = torch.cat([torch.full((batch, 16), 100), text], 1)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids),
            "pixel_values": torch.randn(batch, 3, 16, 16, generator=gen)}


add("paligemma", "multimodal", "PaliGemmaForConditionalGeneration", _paligemma_config, _paligemma_inputs,
    causal_labels, "AutoModelForImageTextToText", tied=True,
    notes="SigLIP vision tower (vision_use_head=False) + multi_modal_projector.linear + Gemma")


def _ved_config():
    return transformers.VisionEncoderDecoderConfig.from_encoder_decoder_configs(
        transformers.ViTConfig(**{k: v for k, v in VIT_LIKE.items() if k != "num_labels"}),
        transformers.GPT2Config(vocab_size=V, n_embd=32, n_layer=1, n_head=4, n_positions=64, add_cross_attention=True,
                                is_decoder=True),
        decoder_start_token_id=1, pad_token_id=0)


add("vision-encoder-decoder", "multimodal", "VisionEncoderDecoderModel", _ved_config,
    lambda batch, gen: {"pixel_values": torch.randn(batch, 3, 16, 16, generator=gen),
                        "decoder_input_ids": _ids(batch, gen, 6)},
    seq2seq_labels, "AutoModelForImageTextToText", tied=True,
    notes="ViT encoder + GPT-2 decoder with cross-attention (Conv1D c_attn, q_attn); transformers 5 has no AutoModelForVision2Seq (4.x did)")

# bf16: the cases the sweep also builds in torch.bfloat16 (``case.build(torch.bfloat16)``).
BF16_KEYS = ["bert", "gpt2", "llama", "t5", "vit", "wav2vec2", "mixtral", "clip"]


def by_key(key: str) -> Case:
    for case in CASES:
        if case.key == key:
            return case
    raise KeyError(key)


def _check_unique() -> None:
    keys = [case.key for case in CASES]
    dupes = {k for k in keys if keys.count(k) > 1}
    assert not dupes, dupes


_check_unique()
