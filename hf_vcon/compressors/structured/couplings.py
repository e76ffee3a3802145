"""Which layers of a block share a structural unit, per architecture: the declarative table structured pruning reads.

Removing MLP neuron j of a block removes row j of every *producer* (``intermediate.dense``; Llama's ``gate_proj`` and
``up_proj``; GPT-2's ``c_fc``) and column j of every *consumer* (``output.dense``, ``down_proj``, ``c_proj``), and the
model's config says how many neurons a block has (``intermediate_size``, GPT-2's ``n_inner``). Removing a
key/value group of a grouped-query attention removes its key and value heads, the query heads that read them and
their columns of the output projection; the config then says ``num_key_value_heads``, ``num_attention_heads`` and
``head_dim``. transformers 5 has no ``prune_heads`` / ``pruned_heads``: a smaller model is expressible only through
those global sizes, so every block loses the same number of units, and heads only where the attention takes its
head size from ``config.head_dim`` (architectures that derive it as ``hidden_size / num_attention_heads`` — BERT,
GPT-2, ViT — would change it when heads go).

A coupling names the layers by their suffix inside a block (PEFT's dotted-suffix rule); a block is every module
prefix P for which ``P.<first producer>`` exists. Architectures not in the table: declare theirs with
:func:`register_coupling`.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any, Optional, Union

from torch import nn

from ...utils.linears import LINEAR_TYPES, linear_shape

ROWS, COLUMNS = "rows", "columns"


@dataclass(frozen=True)
class NeuronCoupling:
    """The MLP of a block: ``producers`` compute the intermediate neurons (one output row each), ``consumers`` read
    them (one input column each); ``size_field`` is the config field holding the number of neurons per block (a
    tuple of fields where encoder and decoder have one each, such as BART's ``encoder_ffn_dim`` and
    ``decoder_ffn_dim``: every block must then have the same size).

    Example:
        >>> NeuronCoupling(producers=("mlp.w1", "mlp.w3"), consumers=("mlp.w2",), size_field="ffn_dim")
        NeuronCoupling(producers=('mlp.w1', 'mlp.w3'), consumers=('mlp.w2',), size_field='ffn_dim')
    """

    producers: tuple[str, ...]
    consumers: tuple[str, ...]
    size_field: Union[str, tuple[str, ...]]
    kind = "neurons"

    def __post_init__(self) -> None:
        _check_suffixes(self, producers=self.producers, consumers=self.consumers)
        fields = (self.size_field,) if isinstance(self.size_field, str) else self.size_field
        if not isinstance(fields, tuple) or not fields or not all(isinstance(f, str) and f for f in fields):
            raise TypeError(f"size_field={self.size_field!r} must name the config field(s) of the block's neuron count.")

    @property
    def size_fields(self) -> tuple[str, ...]:
        return (self.size_field,) if isinstance(self.size_field, str) else self.size_field

    def members(self) -> tuple[tuple[str, str], ...]:
        return tuple((suffix, ROWS) for suffix in self.producers) + tuple((suffix, COLUMNS) for suffix in self.consumers)

    def units(self, config: Any, shapes: dict[str, tuple[int, int]]) -> int:
        return shapes[self.producers[0]][0]

    def config_changes(self, kept: int, widths: dict[str, int]) -> dict[str, int]:
        return {field: kept for field in self.size_fields}

    def check_config(self, config: Any) -> Optional[str]:
        missing = [field for field in self.size_fields if not hasattr(config, field)]
        if missing:
            return f"its config has no field {missing[0]!r} to hold the smaller MLP size"
        return None

    def check_widths(self, widths: dict[str, int]) -> Optional[str]:
        return None


@dataclass(frozen=True)
class HeadCoupling:
    """The attention of a block whose config says ``head_dim``: a unit is one key/value group, i.e. its key and value
    heads (``head_dim`` rows of ``key`` and ``value``), the ``num_attention_heads / num_key_value_heads`` query heads
    that read them (rows of ``query``) and their columns of ``output``.

    Example:
        >>> HeadCoupling(query="self_attn.q_proj", key="self_attn.k_proj", value="self_attn.v_proj",
        ...              output="self_attn.o_proj").kind
        'heads'
    """

    query: str
    key: str
    value: str
    output: str
    kind = "heads"

    def __post_init__(self) -> None:
        _check_suffixes(self, producers=(self.query, self.key, self.value), consumers=(self.output,))

    @property
    def producers(self) -> tuple[str, ...]:
        return (self.query, self.key, self.value)

    def members(self) -> tuple[tuple[str, str], ...]:
        return ((self.query, ROWS), (self.key, ROWS), (self.value, ROWS), (self.output, COLUMNS))

    def units(self, config: Any, shapes: dict[str, tuple[int, int]]) -> int:
        return int(getattr(config, "num_key_value_heads", None) or config.num_attention_heads)

    def config_changes(self, kept: int, widths: dict[str, int]) -> dict[str, int]:
        head_dim = widths[self.key]
        return {"num_key_value_heads": kept, "num_attention_heads": kept * (widths[self.query] // head_dim),
                "head_dim": head_dim}

    def check_config(self, config: Any) -> Optional[str]:
        if not hasattr(config, "num_attention_heads"):
            return "its config has no num_attention_heads"
        return None

    def check_widths(self, widths: dict[str, int]) -> Optional[str]:
        head_dim, group = widths[self.key], widths[self.query]
        if widths[self.value] != head_dim or widths[self.output] != group or group % head_dim:
            return (f"a key/value group spans {widths} rows/columns of {self.query}, {self.key}, {self.value}, "
                    f"{self.output}: not whole heads of one head_dim")
        return None


Coupling = Union[NeuronCoupling, HeadCoupling]


def _check_suffixes(coupling: Any, **groups: tuple[str, ...]) -> None:
    for field, suffixes in groups.items():
        if not isinstance(suffixes, tuple) or not suffixes or not all(isinstance(s, str) and s for s in suffixes):
            raise TypeError(f"{type(coupling).__name__}: {field}={suffixes!r} must be a non-empty tuple of module-name "
                            "suffixes such as ('mlp.up_proj',).")


def _mlp(producers: Union[str, tuple[str, ...]], consumer: str, size_field: Union[str, tuple[str, ...]]) -> NeuronCoupling:
    return NeuronCoupling((producers,) if isinstance(producers, str) else producers, (consumer,), size_field)


def _heads(query: str, key: str, value: str, output: str, prefix: str = "self_attn.") -> HeadCoupling:
    return HeadCoupling(prefix + query, prefix + key, prefix + value, prefix + output)


_BERT_MLP = _mlp("intermediate.dense", "output.dense", "intermediate_size")
_FC_MLP = _mlp("mlp.fc1", "mlp.fc2", "intermediate_size")  # transformers 5 names ViT's and BEiT's MLP this way
_AUDIO_MLP = _mlp("intermediate_dense", "output_dense", "intermediate_size")  # wav2vec2 (conformer: ffn1 and ffn2)
_GPT2_MLP = _mlp("mlp.c_fc", "mlp.c_proj", "n_inner")
_GPTJ_MLP = _mlp("mlp.fc_in", "mlp.fc_out", "n_inner")
_NEOX_MLP = _mlp("mlp.dense_h_to_4h", "mlp.dense_4h_to_h", "intermediate_size")
_GLU_MLP = _mlp(("mlp.gate_proj", "mlp.up_proj"), "mlp.down_proj", "intermediate_size")
_T5_MLPS = (_mlp("DenseReluDense.wi", "DenseReluDense.wo", "d_ff"),  # the two kinds of T5 feed-forward
            _mlp(("DenseReluDense.wi_0", "DenseReluDense.wi_1"), "DenseReluDense.wo", "d_ff"))
_SEQ2SEQ_MLP = _mlp("fc1", "fc2", ("encoder_ffn_dim", "decoder_ffn_dim"))
_GQA_HEADS = _heads("q_proj", "k_proj", "v_proj", "o_proj")

# model_type → the couplings of its blocks. Alternatives of one kind are tried in order (transformers versions name
# some layers differently); the first one the model has is used. Every entry is checked by the architecture sweep
# (tests/test_architectures.py): the smaller model, reloaded, gives the logits of the patched one at β = 0.
_BUILT_IN: dict[str, tuple[Coupling, ...]] = {
    **{name: (_BERT_MLP,) for name in (
        "bert", "roberta", "camembert", "xlm-roberta", "data2vec-text", "electra", "ernie", "megatron-bert", "roformer",
        "convbert", "nystromformer", "big_bird", "longformer", "mpnet", "deberta", "deberta-v2", "data2vec-vision")},
    **{name: (_FC_MLP, _BERT_MLP) for name in ("vit", "deit", "beit", "audio-spectrogram-transformer")},
    **{name: (_AUDIO_MLP,) for name in (
        "wav2vec2", "hubert", "wavlm", "data2vec-audio", "sew", "unispeech", "wav2vec2-conformer")},
    "gpt2": (_GPT2_MLP,),
    "gpt_bigcode": (_GPT2_MLP,),
    "gptj": (_GPTJ_MLP,),
    "codegen": (_GPTJ_MLP,),
    "gpt_neox": (_NEOX_MLP,),
    "falcon": (_mlp("mlp.dense_h_to_4h", "mlp.dense_4h_to_h", "ffn_hidden_size"),),
    **{name: (_GLU_MLP, _GQA_HEADS) for name in (
        "llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "olmo", "granite")},
    **{name: (_GLU_MLP,) for name in ("olmo2", "cohere", "stablelm")},
    "starcoder2": (_mlp("mlp.c_fc", "mlp.c_proj", "intermediate_size"), _GQA_HEADS),
    "phi": (_FC_MLP, _heads("q_proj", "k_proj", "v_proj", "dense")),
    **{name: _T5_MLPS for name in ("t5", "mt5", "umt5", "longt5")},
    **{name: (_SEQ2SEQ_MLP,) for name in (
        "bart", "mbart", "pegasus", "marian", "blenderbot", "m2m_100", "led", "whisper", "speech_to_text")},
    "prophetnet": (_mlp("feed_forward.intermediate", "feed_forward.output", ("encoder_ffn_dim", "decoder_ffn_dim")),),
    "opt": (_mlp("fc1", "fc2", "ffn_dim"),),
    "distilbert": (_mlp("ffn.lin1", "ffn.lin2", "hidden_dim"),),
    "albert": (_mlp("ffn", "ffn_output", "intermediate_size"),),
    "xlnet": (_mlp("ff.layer_1", "ff.layer_2", "d_inner"),),
    "funnel": (_mlp("ffn.linear_1", "ffn.linear_2", "d_inner"),),
}
_REGISTERED: dict[str, tuple[Coupling, ...]] = {}


def register_coupling(model_type: str, *couplings: Coupling) -> None:
    """Declare the coupled layers of an architecture's blocks for ``method="structured"`` (replacing a built-in
    entry for the same ``model_type``).

    Args:
        model_type: the ``config.model_type`` of the architecture.
        couplings: one :class:`NeuronCoupling` (the MLP) and optionally one :class:`HeadCoupling` (attention with an
            explicit ``head_dim``).

    Raises:
        TypeError: for anything but couplings, or two of one kind.

    Example:
        >>> from hf_vcon.compressors.structured.couplings import NeuronCoupling, register_coupling
        >>> register_coupling("my_model", NeuronCoupling(("mlp.w1", "mlp.w3"), ("mlp.w2",), "ffn_dim"))
    """
    if not isinstance(model_type, str) or not model_type:
        raise TypeError(f"register_coupling: model_type={model_type!r} must be a config's model_type (a string).")
    if not couplings or not all(isinstance(c, (NeuronCoupling, HeadCoupling)) for c in couplings):
        raise TypeError("register_coupling takes NeuronCoupling / HeadCoupling objects, e.g. "
                        "NeuronCoupling(('mlp.up_proj',), ('mlp.down_proj',), 'intermediate_size').")
    kinds = [coupling.kind for coupling in couplings]
    if len(set(kinds)) != len(kinds):
        raise TypeError(f"register_coupling({model_type!r}): one coupling per kind (neurons, heads), got {kinds}.")
    _REGISTERED[model_type] = tuple(couplings)


def couplings_for(model_type: Optional[str]) -> Optional[tuple[Coupling, ...]]:
    """The couplings declared for ``model_type`` (registered ones first), or ``None``."""
    return _REGISTERED.get(model_type) or _BUILT_IN.get(model_type)


def known_model_types(kind: str = "neurons") -> list[str]:
    """The model types with a coupling of ``kind`` (``"neurons"`` or ``"heads"``), sorted."""
    table = {**_BUILT_IN, **_REGISTERED}
    return sorted(key for key, couplings in table.items() if any(c.kind == kind for c in couplings))


@dataclass(frozen=True)
class Block:
    """One block's coupled layers, found in a model: ``names`` (full module names), each taken along ``ROWS`` or
    ``COLUMNS`` in slices of ``widths`` rows/columns per unit; ``units`` units in all."""

    coupling: Coupling
    prefix: str
    names: tuple[str, ...]
    along: tuple[str, ...]
    widths: tuple[int, ...]
    units: int

    def config_changes(self, kept: int) -> dict[str, int]:
        """The config fields of a model whose blocks keep ``kept`` units each."""
        suffixes = [name[len(self.prefix) + 1:] if self.prefix else name for name in self.names]
        return self.coupling.config_changes(kept, dict(zip(suffixes, self.widths)))


def find_blocks(model: nn.Module, coupling: Coupling) -> list[Block]:
    """Every block of ``model`` that has the layers ``coupling`` names, in model order.

    Raises:
        ValueError: if a block has the first producer but not the other layers, or their shapes do not split into the
            same number of units.
    """
    linears = {name: module for name, module in model.named_modules() if isinstance(module, LINEAR_TYPES)}
    anchor = coupling.members()[0][0]
    blocks = []
    for name in linears:
        if name != anchor and not name.endswith(f".{anchor}"):
            continue
        prefix = name[: -len(anchor)].rstrip(".")
        full = {suffix: f"{prefix}.{suffix}" if prefix else suffix for suffix, _ in coupling.members()}
        missing = [full_name for full_name in full.values() if full_name not in linears]
        if missing:
            raise ValueError(f"method='structured': block {prefix!r} has {name!r} but not the layers it is coupled with "
                             f"({missing}); declare this architecture's coupling with hf_vcon.register_coupling.")
        shapes = {suffix: linear_shape(linears[full_name]) for suffix, full_name in full.items()}
        blocks.append(_block(coupling, prefix, full, shapes, getattr(model, "config", None)))
    return blocks


def _block(coupling: Coupling, prefix: str, full: dict[str, str], shapes: dict, config: Any) -> Block:
    units = coupling.units(config, shapes)
    widths = []
    for suffix, along in coupling.members():
        size = shapes[suffix][0 if along == ROWS else 1]
        if units <= 0 or size % units:
            raise ValueError(
                f"method='structured': {full[suffix]!r} has {size} {along}, which do not split into the {units} "
                f"{coupling.kind} of block {prefix!r}; its coupling does not fit this model.")
        widths.append(size // units)
    problem = coupling.check_widths({suffix: width for (suffix, _), width in zip(coupling.members(), widths)})
    if problem:
        raise ValueError(f"method='structured': in block {prefix!r}, {problem}; its coupling does not fit this model.")
    return Block(coupling, prefix, tuple(full.values()), tuple(along for _, along in coupling.members()),
                 tuple(widths), units)


def resized_config(config: Any, changes: dict[str, Any]) -> Any:
    """A copy of a model config with ``changes`` applied (the config itself is not changed)."""
    resized = copy.deepcopy(config)
    for key, value in changes.items():
        setattr(resized, key, value)
    return resized
