"""The architecture sweep: every promise of hf_vcon on tiny models of many transformers model types (encoders,
encoder-decoders, decoders with GQA / fused qkv / MoE experts, vision, audio, dual encoders, multimodal), for four
settings, plus bf16 builds and a tied-embedding model.

Promises, per case and setting: β = 1 computes the original model; β = 0 computes ``merge_and_unload``'s model; the
merged model reloads with plain ``from_pretrained``; the compact checkpoint reloads to the same outputs; one training
step at β = 0.5 gives every VCON unit a gradient; the summary covers every unit. A model type that cannot take a
setting must say so at ``apply_vcon`` (never a silent wrong result): the expected refusals are listed below.
"""

from __future__ import annotations

import copy
import json
import warnings

import pytest
import torch
import transformers

from architectures import BF16_KEYS, CASES
from conftest import FLOAT32
from hf_vcon.compressors.structured.couplings import couplings_for
from hf_vcon.export.merged import stored_sizes
from hf_vcon import (
    NoTargetModulesError,
    VConConfig,
    VConError,
    VConWarning,
    apply_vcon,
    get_vcon_state,
    load_compressed,
    merge_and_unload,
    merged_state_dict,
    save_compressed,
    save_merged,
    set_beta,
    vcon_summary,
)

SETTINGS = {
    "prune": dict(method="prune", sparsity=0.5),
    "2:4": dict(method="prune", prune_pattern="2:4"),
    "binary": dict(method="binary"),
    "lowrank": dict(method="lowrank", rank_ratio=0.25),
    "structured": dict(method="structured", neuron_sparsity=0.5),
    "structured-heads": dict(method="structured", neuron_sparsity=0.25, head_sparsity=0.5),
}
# Model types with no Linear that "all-linear" may compress (ResNet's only Linear is its classifier head).
NOTHING_TO_COMPRESS = {"resnet"}
SKIP_ON_4 = {"gemma3_text", "deepseek_v2", "deepseek_v3", "gpt_oss", "olmo2", "modernbert"}  # newer than 4.57


def available(case) -> bool:
    return hasattr(transformers, case.model_class) and not (
        int(transformers.__version__.split(".")[0]) < 5 and case.name in SKIP_ON_4)


# The default run's sweep: every family, and every model type that once went wrong (MultiheadAttention heads,
# in-place writers, weights read directly, nested heads, MoE experts and gates, tied embeddings). The rest of the
# catalog runs with -m slow.
SWEEP_KEYS = {
    "bert", "roberta", "electra", "deberta", "deberta-v2", "distilbert", "albert", "mpnet", "modernbert",
    "longformer", "xlnet", "t5", "umt5", "longt5", "switch_transformers", "bart", "bart:seqcls", "marian", "gpt2",
    "gpt_neox", "gptj", "llama", "llama:tied", "qwen2", "phi3", "gemma2", "falcon", "bloom", "opt", "mixtral",
    "qwen2_moe", "deepseek_v3", "gpt_oss", "vit", "deit", "beit", "swinv2", "convnext", "levit", "resnet",
    "wav2vec2", "hubert", "wavlm", "whisper", "clip", "siglip", "llava", "paligemma", "vision-encoder-decoder",
}
CASE_PARAMS = [pytest.param(case, id=case.key, marks=() if case.key in SWEEP_KEYS else pytest.mark.slow)
               for case in CASES]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models run fastest on one thread, and many times faster than on two threads of a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def output(model, case, inputs) -> torch.Tensor:
    with torch.no_grad():
        return getattr(model(**inputs), case.output_key).float()


def assert_same(actual: torch.Tensor, expected: torch.Tensor, what: str, tolerance: float = 1e-5) -> None:
    scale = max(1.0, float(expected.abs().max()))
    torch.testing.assert_close(actual, expected, atol=tolerance * scale, rtol=0, msg=lambda m: f"{what}: {m}")


def patched(case, setting: str, dtype=None):
    original = case.build(dtype)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", VConWarning)  # all-linear leaves layers a setting cannot take dense, saying so
        model = apply_vcon(copy.deepcopy(original), VConConfig(**SETTINGS[setting]))
    return original, model


def test_the_sweep_covers_forty_model_types_of_every_family():
    swept = [case for case in CASES if case.key in SWEEP_KEYS and available(case)]
    types = {case.name for case in swept}
    families = {case.family for case in swept}
    assert len(SWEEP_KEYS) == len({case.key for case in CASES} & SWEEP_KEYS)  # every key names a case
    assert len(types) >= 40
    assert {"encoder", "encoder-decoder", "decoder", "decoder-moe", "vision", "audio", "dual-encoder"} <= families


@pytest.mark.parametrize("setting", list(SETTINGS))
@pytest.mark.parametrize("case", CASE_PARAMS)
def test_every_promise(case, setting, tmp_path):
    if not available(case):
        pytest.skip(f"{case.model_class} is not in transformers {transformers.__version__}")
    refusal = expected_refusal(case, setting)
    if refusal is not None:
        error, message = refusal
        with pytest.raises(error, match=message):
            patched(case, setting)
        return
    original, model = patched(case, setting)
    state = get_vcon_state(model)
    inputs = case.inputs()
    assert_same(output(model, case, inputs), output(original, case, inputs), "beta 1 vs original")

    set_beta(model, 0.0)
    compressed = output(model, case, inputs)
    merged = merge_and_unload(copy.deepcopy(model))
    assert_same(output(merged, case, inputs), compressed, "beta 0 vs merged")

    merged.save_pretrained(tmp_path / "merged")
    reloaded = getattr(transformers, case.reload_class).from_pretrained(tmp_path / "merged").eval()
    assert_same(output(reloaded, case, inputs), compressed, "merged reloaded")
    if any(layer.compressor.changes_shapes for layer in state.layers):  # already small: the merged model is compact
        with pytest.raises(VConError, match="already the compact form"):
            save_compressed(model, tmp_path / "compact")
    else:
        save_compressed(model, tmp_path / "compact")
        assert_same(output(load_compressed(tmp_path / "compact"), case, inputs), compressed, "compact reloaded")

    summary = vcon_summary(model)
    assert [layer.name for layer in summary.layers] == state.targeted_module_names
    assert summary.bytes_after <= summary.bytes_before
    if case.has_labels:
        assert_one_step_trains_every_unit(model, original, case)


def expected_refusal(case, setting: str):
    """``(error, message)`` that ``apply_vcon`` must raise for ``case`` and ``setting``, or ``None``: structured
    pruning needs the model type's coupling (its MLP; heads only where the config says head_dim)."""
    if case.name in NOTHING_TO_COMPRESS:
        return NoTargetModulesError, ""
    if not setting.startswith("structured"):
        return None
    model_type = case.config().model_type
    kinds = {coupling.kind for coupling in couplings_for(model_type) or ()}
    if "neurons" not in kinds:
        return ValueError, rf"a '{model_type}' model are coupled.*register_coupling"
    if "head_sparsity" in SETTINGS[setting] and "heads" not in kinds:
        return ValueError, rf"a '{model_type}' model cannot lose attention heads"
    return None


def trained_by_the_original(original, case) -> set[str]:
    """The parameter names one training step of the unpatched model gives a gradient (a pooler the loss does not
    use, an unrouted expert get none, with or without VCON)."""
    original.train()
    torch.manual_seed(0)  # layer drop, routing jitter: the same draws as the patched model's step
    original(**case.labels_inputs()).loss.backward()
    return {name for name, param in original.named_parameters() if param.grad is not None}


def assert_one_step_trains_every_unit(model, original, case) -> None:
    """One step at β = 0.5: finite loss, and every unit that ran and whose weight the unpatched model trains gets a
    gradient on its latent weight and on its own tensors (routing may send the blended model's tokens to other
    experts)."""
    trained = trained_by_the_original(original, case)
    state = get_vcon_state(model)
    ran = set()
    hooks = [layer.register_forward_hook(lambda *args, key=id(layer): ran.add(key))
             for layer in state.layers]
    model.train()
    set_beta(model, 0.5)
    torch.manual_seed(0)
    loss = model(**case.labels_inputs()).loss
    for hook in hooks:
        hook.remove()
    assert torch.isfinite(loss)
    loss.backward()
    for name, layer in zip(state.targeted_module_names, state.layers):
        if layer.merged_key(name) in trained and id(layer) in ran:
            tensors = [layer.weight, *layer.compressed_params().values()]
            assert all(t.grad is not None for t in tensors if t.requires_grad), f"{name} got no gradient"


BF16_PARAMS = [pytest.param(case, id=f"{case.key}-bf16") for case in CASES if case.key in BF16_KEYS]


@pytest.mark.parametrize("setting", ["binary", "lowrank"])
@pytest.mark.parametrize("case", BF16_PARAMS)
def test_bf16_models_stay_bf16_through_both_exports(case, setting, tmp_path):
    if not available(case):
        pytest.skip(f"{case.model_class} is not in transformers {transformers.__version__}")
    _, model = patched(case, setting, torch.bfloat16)
    inputs = {key: value.to(torch.bfloat16) if value.is_floating_point() else value
              for key, value in case.inputs().items()}
    set_beta(model, 0.0)
    compressed = output(model, case, inputs)
    save_compressed(model, tmp_path / "compact")
    loaded = load_compressed(tmp_path / "compact")
    assert {param.dtype for param in loaded.parameters()} == {torch.bfloat16}
    # C itself is exact in bf16; low-rank's β = 0 path B(Ax) rounds differently from the merged B·A.
    tolerance = 0 if setting == "binary" else 5e-2
    assert_same(output(loaded, case, inputs), compressed, "bf16 compact reloaded", tolerance)
    merged = merge_and_unload(copy.deepcopy(model))
    assert_same(output(merged, case, inputs), compressed, "bf16 merged", tolerance)


@pytest.mark.parametrize("setting", ["prune", "binary"])
@pytest.mark.parametrize("case", BF16_PARAMS)
def test_bf16_autocast_step_keeping_the_16_bit_weight_equals_rebuilding_it(case, setting, monkeypatch):
    """Under autocast a VCON layer keeps its 16-bit effective weight for backward; one training step's loss and every
    gradient equal, bit for bit, those of the rebuild-in-backward path (fp32 W_eff cast by autocast in forward)."""
    if not available(case):
        pytest.skip(f"{case.model_class} is not in transformers {transformers.__version__}")
    _, model = patched(case, setting)
    set_beta(model, 0.5)
    model.eval()  # no dropout: both steps draw nothing

    def step():
        model.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(**case.labels_inputs()).loss
        loss.backward()
        return loss.detach(), {name: param.grad.clone() for name, param in model.named_parameters()
                               if param.grad is not None}

    kept_loss, kept = step()
    monkeypatch.setattr("hf_vcon.layers.protocol.autocast_dtype", lambda device_type: None)
    rebuilt_loss, rebuilt = step()
    assert torch.equal(kept_loss, rebuilt_loss) and kept.keys() == rebuilt.keys() and kept
    for name, grad in kept.items():
        assert torch.equal(grad, rebuilt[name]), name


# ------------------------------------------------------------------------------- quant: the exports that load
QUANT = dict(method="quant", bits=4, strategy="group", group_size=16)
# Why a model type's compressed-tensors folder is refused before writing (then it is saved dense, saying so).
CT_REFUSED = ("Conv1D modules (GPT-2 style)", "no compressed layer has integer weights")


@pytest.mark.parametrize("case", CASE_PARAMS)
def test_quantized_model_saves_a_folder_that_loads_to_the_merged_model(case, tmp_path):
    """``save_merged`` under ``"auto"``: the written folder loads with plain transformers to the merged model's
    outputs, in compressed-tensors where that folder loads back, dense with a warning saying why otherwise."""
    if not available(case):
        pytest.skip(f"{case.model_class} is not in transformers {transformers.__version__}")
    if case.name in NOTHING_TO_COMPRESS:
        pytest.skip("no Linear that all-linear may compress")
    pytest.importorskip("compressed_tensors")
    original = case.build()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", VConWarning)  # layers group_size does not divide stay dense, saying so
        model = apply_vcon(copy.deepcopy(original), VConConfig(transition_steps=0, **QUANT))
    set_beta(model, 0.0)
    inputs = case.inputs()
    expected = output(merge_and_unload(copy.deepcopy(model)), case, inputs)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        save_merged(model, tmp_path)
    # transformers 4.x loads a quantized checkpoint in float16 unless told otherwise
    reloaded = getattr(transformers, case.reload_class).from_pretrained(tmp_path, **FLOAT32).eval()
    assert_same(output(reloaded, case, inputs), expected, "quantized folder reloaded")
    config = json.loads((tmp_path / "config.json").read_text())
    if "quantization_config" not in config:
        said = [str(w.message) for w in caught if issubclass(w.category, VConWarning)
                and str(w.message).startswith("Saving the merged model dense: ")]
        assert said, f"{case.key} was saved dense without saying why"
        assert any("does not load back" in message or any(reason in message for reason in CT_REFUSED)
                   for message in said), said
    assert_card_sizes(model, tmp_path, tmp_path / "dense")


def assert_card_sizes(model, written, dense) -> None:
    """The model card's sizes (:func:`~hf_vcon.export.merged.stored_sizes`) find every targeted layer in the folder,
    whatever names transformers saved them under: in a dense folder exactly the merged weights' bytes, in a
    compressed-tensors folder fewer."""
    names = get_vcon_state(model).targeted_module_names
    merged = merged_state_dict(model)
    weights = sum(merged[get_vcon_state(model).layers[index].merged_key(name)].numel() * 4
                  for index, name in enumerate(names))
    save_merged(model, dense, format="dense")
    targeted, total = stored_sizes(str(dense), names, model)
    assert targeted == weights and total > targeted, (targeted, weights, total)
    if "quantization_config" in json.loads((written / "config.json").read_text()):
        targeted, total = stored_sizes(str(written), names, model)
        assert 0 < targeted < weights and total > targeted, (targeted, weights, total)
